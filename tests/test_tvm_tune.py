"""MetaSchedule tuning databases: written by tune_tvm / `regc tune`, used by lower_tvm, refused if stale."""

import json

import numpy as np
import pytest
import torch

import regc
import regc.plugins
from regc.backends.tvm_backend import lower_tvm
from regc.backends.tvm_tune import FORMAT_VERSION, INFO_FILE, tune_tvm
from regc.cli import build_parser
from regc.errors import ConfigError


def tiny_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(2, 32)
    gm = torch.export.export(mlp, (x,)).module()
    return regc.Model(gm=gm, input_names=["x"], output_names=["y"], example_inputs=(x,))


@pytest.mark.slow
def test_tuned_build_uses_the_database_and_matches_the_untuned_build(tmp_path):
    model = tiny_mlp()
    lines = []
    db = tune_tvm(model, trials=4, db=tmp_path / "db", max_kernels=1, log=lines.append)
    info = json.loads((tmp_path / "db" / INFO_FILE).read_text())
    assert info == db.info and info["preset"] == "x86_64" and info["trials"] == 4
    assert info["target"]["kind"] == "llvm" and {"tvm", "tvm_ffi"} <= set(info["versions"])
    # main calls two kernels, the matmuls (the weight transposes run once per weight set, in
    # main_transform_params); max_kernels=1 tunes the one with more FLOPs, 32 -> 64 (+ReLU)
    assert len(info["kernels"]) == 1 and next(iter(info["kernels"])).startswith("fused_matmul_add_relu")
    assert all(h.isdigit() for h in info["kernels"].values())
    assert (tmp_path / "db" / "database_tuning_record.json").stat().st_size > 0
    assert next(line for line in lines if line.startswith("tuning ")).startswith("tuning 1 of 2 kernels")
    assert any(line.startswith("[") and " trials, " in line for line in lines)  # progress per measured batch
    assert any(line.startswith("[") and " candidates built, " in line for line in lines)  # ... and per build

    tuned = lower_tvm(model, tuning_db=tmp_path / "db")
    untuned = lower_tvm(model)
    assert tuned.meta.tuning == "tuned" and untuned.meta.tuning == "untuned"
    assert untuned.meta.tuning_db is None
    assert tuned.meta.tuning_db["kernels_tuned"] == 1 and tuned.meta.tuning_db["kernels_total"] == 2
    saved = json.loads((tuned.save(tmp_path / "tuned") / "meta.json").read_text())
    assert saved["tuning"] == "tuned" and saved["tuning_db"]["records_sha256"] == info["records_sha256"]
    # the tuned kernel reads its weight in a tiled layout; the repacking is a kernel of its own that runs
    # once per weight set (main_transform_params), not a step of every run
    assert "_weight_prepack" in tuned.kernel_source("llvm")
    assert "_weight_prepack" not in untuned.kernel_source("llvm")
    x = torch.randn(2, 32)
    np.testing.assert_allclose(tuned(x).numpy(), untuned(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tuned(x).numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_kernel_whose_candidates_are_spent_stops_and_leaves_the_budget(tmp_path):
    # one elementwise kernel has a handful of schedules: once a batch brings no new candidate the
    # kernel stops, instead of the scheduler searching it again until the 200 trials are used up
    torch.manual_seed(0)
    x = torch.randn(2, 32)
    gm = torch.export.export(torch.nn.ReLU().eval(), (x,)).module()
    model = regc.Model(gm=gm, input_names=["x"], output_names=["y"], example_inputs=(x,))
    lines = []
    tune_tvm(model, trials=200, db=tmp_path / "db", log=lines.append)
    measured = [line for line in lines if " trials, " in line]
    assert measured[-1].endswith("stops: no new candidate")
    done = int(measured[-1].split("/")[0].lstrip("["))
    assert 0 < done < 64  # every distinct candidate measured once, far from the budget
    assert sum("stops" in line for line in measured) == 1


@pytest.mark.slow
def test_the_builder_keeps_its_worker_process_across_batches():
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from regc.backends.tvm_tune import _reusing_builder, import_tensor_intrinsics

    a = te.placeholder((16,), name="a")
    b = te.compute((16,), lambda i: a[i] * 2.0, name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    built = []
    builder = _reusing_builder(timeout_sec=300, initializer=import_tensor_intrinsics, on_built=built.append)
    try:
        pids = []
        for _ in range(2):  # two batches, as tune_tasks sends them
            results = builder.build([ms.builder.BuilderInput(mod, tvm.target.Target("llvm"))] * 2)
            assert [r.error_msg for r in results] == [None, None]
            assert all(r.artifact_path.endswith(".tar") for r in results)
            pids += [w._proc.pid for w in builder.pool._worker_map.values()]
        assert len(pids) == 2 and pids[0] == pids[1]  # one worker, not a new process per batch
        assert built == [2, 2]  # progress after each batch
    finally:
        builder.close()


def write_info(folder, **changes):
    folder.mkdir()
    info = {"format_version": FORMAT_VERSION, "preset": "x86_64", "target": {"kind": "llvm"}, "versions": {}}
    (folder / INFO_FILE).write_text(json.dumps({**info, **changes}))
    return folder


def test_stale_or_foreign_databases_are_refused(tmp_path):
    model = tiny_mlp()
    with pytest.raises(ConfigError, match="no regc_tuning.json"):
        lower_tvm(model, tuning_db=tmp_path)
    with pytest.raises(ConfigError, match="was tuned for target 'aarch64' .*, not 'x86_64'"):
        lower_tvm(model, tuning_db=write_info(tmp_path / "other-target", preset="aarch64",
                                              target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    with pytest.raises(ConfigError, match="format_version 7, this regc reads 5; re-run 'regc tune'"):
        lower_tvm(model, tuning_db=write_info(tmp_path / "future", format_version=7))
    with pytest.raises(ConfigError, match="format_version 1, this regc reads 5"):  # kernels before lifting
        lower_tvm(model, tuning_db=write_info(tmp_path / "old", format_version=1))
    with pytest.raises(ConfigError, match="format_version 2, this regc reads 5"):  # weights not layout-free
        lower_tvm(model, tuning_db=write_info(tmp_path / "v2", format_version=2))
    with pytest.raises(ConfigError, match="format_version 3, this regc reads 5"):  # narrow convs still NCHW
        lower_tvm(model, tuning_db=write_info(tmp_path / "v3", format_version=3))
    with pytest.raises(ConfigError, match="format_version 4, this regc reads 5"):  # NHWC convs unfused
        lower_tvm(model, tuning_db=write_info(tmp_path / "v4", format_version=4))


def test_tune_refuses_bad_requests(tmp_path):
    model = tiny_mlp()
    with pytest.raises(ConfigError, match="trials must be a positive integer"):
        tune_tvm(model, trials=0, db=tmp_path / "db")
    with pytest.raises(ConfigError, match="max-kernels must be a positive integer"):
        tune_tvm(model, trials=4, db=tmp_path / "db", max_kernels=0)
    with pytest.raises(ConfigError, match="'aarch64' code cannot run here"):
        tune_tvm(model, "aarch64", trials=4, db=tmp_path / "db")
    dynamic = regc.Model(gm=model.gm, input_names=["x"], output_names=["y"],
                         example_inputs=model.example_inputs,
                         dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    with pytest.raises(ConfigError, match=r"static input shapes.*\{'x': \[0\]\}"):
        tune_tvm(dynamic, trials=4, db=tmp_path / "db")
    assert not (tmp_path / "db").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a tuning database"):
        tune_tvm(model, trials=4, db=tmp_path / "busy")


def test_tuning_names_the_faster_x86_preset_this_cpu_runs_and_refuses_one_it_cannot(tmp_path, monkeypatch):
    import regc.backends.tvm_backend as tb

    model, lines = tiny_mlp(), []
    v3_cpu = frozenset({"sse2", "avx", "avx2", "fma", "f16c", "bmi2"})
    monkeypatch.setattr(tb, "host_cpu_flags", lambda: v3_cpu)
    with pytest.raises(ConfigError, match="trials must be a positive integer"):  # the note comes first
        tune_tvm(model, trials=0, db=tmp_path / "db", log=lines.append)
    assert len(lines) == 1 and "this CPU also runs the 'x86_64_v3' target" in lines[0]
    monkeypatch.setattr(tb, "host_cpu_flags", lambda: frozenset({"sse2", "avx"}))
    lines.clear()
    with pytest.raises(ConfigError, match="trials must be a positive integer"):
        tune_tvm(model, trials=0, db=tmp_path / "db", log=lines.append)
    with pytest.raises(ConfigError, match="its CPU lacks avx2, fma, f16c, bmi2, which 'x86_64_v3' code uses"):
        tune_tvm(model, "x86_64_v3", trials=4, db=tmp_path / "db", log=lines.append)
    assert lines == [] and not (tmp_path / "db").exists()


def test_tune_is_a_regc_command():
    assert "tune" in regc.plugins.commands()
    args = build_parser().parse_args(["tune", "m.onnx", "--target", "x86_64", "--trials", "64", "--db", "d",
                                      "--max-kernels", "8"])
    got = (args.model, args.target, args.trials, args.db, args.max_kernels)
    assert got == ("m.onnx", "x86_64", 64, "d", 8)
    compile_args = ["compile", "m.onnx", "-p", "fold_bn", "--tuning-db", "d", "-o", "o"]
    assert build_parser().parse_args(compile_args).tuning_db == "d"
