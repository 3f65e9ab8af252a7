"""regc.runtime: one runner interface over ONNX files and TVM folders, typed input and file errors,
``regc run`` npz I/O, and latency measurement."""

import json

import numpy as np
import pytest
import torch

from regc.backends.tvm_backend import TensorSpec, lower_tvm
from regc.errors import ConfigError, InputMismatchError, ModelFormatError
from regc.runtime.artifact import open_artifact, run_npz
from regc.runtime.bench import bench, compare, random_inputs
from tests.test_tvm_backend import export_onnx, make_model

TOL = dict(rtol=1e-4, atol=1e-4)


class TwoInOut(torch.nn.Module):
    """Two inputs (float features, int64 token ids) and two outputs."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, ids):
        h = x + self.emb(ids)
        return self.fc(h).relu(), h.sum(1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The same model as regc.Model, ONNX file and TVM folder."""
    torch.manual_seed(0)
    model = make_model(TwoInOut(), (torch.randn(2, 4), torch.tensor([0, 9])),
                       input_names=("x", "ids"), output_names=("y", "s"))
    tmp = tmp_path_factory.mktemp("rt")
    return {"model": model, "onnx": export_onnx(model, tmp / "m.onnx"),
            "tvm": lower_tvm(model).save(tmp / "tvm")}


def _feeds(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ids = torch.randn(2, 4, generator=g), torch.randint(0, 10, (2,), generator=g)
    return {"x": x.numpy(), "ids": ids.numpy()}


@pytest.mark.parametrize("kind", ["onnx", "tvm"])
def test_runners_match_the_model(artifacts, kind):
    runner = open_artifact(artifacts[kind])
    assert runner.input_names == ["x", "ids"] and runner.output_names == ["y", "s"]
    assert [s.dtype for s in runner.input_specs] == ["float32", "int64"]
    feeds = _feeds()
    want = artifacts["model"].run(*(torch.from_numpy(a) for a in feeds.values()))
    got = runner.run(feeds)
    for name, w in zip(["y", "s"], want, strict=True):
        np.testing.assert_allclose(got[name], w.detach().numpy(), **TOL)


def test_threads_option(artifacts):
    feeds = _feeds()
    one, two = open_artifact(artifacts["onnx"]), open_artifact(artifacts["onnx"], threads=2)
    np.testing.assert_allclose(one.run(feeds)["y"], two.run(feeds)["y"], **TOL)
    with pytest.raises(ConfigError, match="threads must be an integer >= 1, got 0"):
        open_artifact(artifacts["onnx"], threads=0)


@pytest.mark.parametrize("kind", ["onnx", "tvm"])
@pytest.mark.parametrize("change,match", [
    (lambda f: f.pop("ids"), r"missing \['ids'\], unexpected \[\]"),
    (lambda f: f.update(extra=np.zeros(1)), r"missing \[\], unexpected \['extra'\]"),
    (lambda f: f.update(x=f["x"].astype(np.float64)), r"input 'x' has dtype float64, expected float32"),
    (lambda f: f.update(ids=f["ids"].astype(np.int32)), r"input 'ids' has dtype int32, expected int64"),
    (lambda f: f.update(x=f["x"][None]), r"input 'x' has shape \(1, 2, 4\), expected \(2, 4\)"),
    (lambda f: f.update(x=np.zeros((2, 5), np.float32)), r"input 'x' has shape \(2, 5\), expected \(2, 4\)"),
])
def test_input_mismatch_is_named(artifacts, kind, change, match):
    feeds = _feeds()
    change(feeds)
    with pytest.raises(InputMismatchError, match=match):
        open_artifact(artifacts[kind]).run(feeds)


def _set_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shape_params(folder):
    import tvm

    params = dict(tvm.runtime.load_param_dict_from_file(str(folder / "model.params")))
    params["fc.weight"] = tvm.runtime.tensor(np.zeros((4, 4), np.float32))
    tvm.runtime.save_param_dict_to_file(params, str(folder / "model.params"))


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "meta.json").unlink(), "no meta.json"),
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json: unreadable or malformed"),
    (lambda d: _set_meta(d, format_version=99), "format_version 99, this regc reads 1"),
    (lambda d: _set_meta(d, inputs=[{"shape": [1]}]), "meta.json: unreadable or malformed"),
    (lambda d: _truncate(d / "model.so"), "model.so: sha256 differs"),  # dlopen of it would crash
    (lambda d: (d / "model.params").unlink(), "model.params is missing"),
    (lambda d: _truncate(d / "model.params"), "model.params: not a TVM parameter file"),
    (lambda d: (d / "model.params").write_bytes((d / "model.so").read_bytes()), "not a TVM parameter file"),
    (_wrong_shape_params, r"parameter 'fc.weight' is float32\(4, 4\), expected float32\(3, 4\)"),
])
def test_damaged_tvm_folder_is_a_format_error(artifacts, tmp_path, damage, match):
    import shutil

    folder = shutil.copytree(artifacts["tvm"], tmp_path / "tvm")
    damage(folder)
    with pytest.raises(ModelFormatError, match=match):
        open_artifact(folder)


def test_unreadable_artifacts_are_format_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file or folder"):
        open_artifact(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load it"):
        open_artifact(tmp_path / "bad.onnx")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    for path in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(ModelFormatError, match="not a runnable artifact"):
            open_artifact(path)


@pytest.mark.parametrize("kind", ["onnx", "tvm"])
def test_run_npz_round_trip(artifacts, tmp_path, kind):
    feeds = _feeds()
    np.savez(tmp_path / "in.npz", **feeds)
    returned = run_npz(artifacts[kind], tmp_path / "in.npz", tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
        assert f.files == ["y", "s"]
        for name in f.files:
            np.testing.assert_array_equal(f[name], returned[name])
    np.testing.assert_allclose(returned["y"], open_artifact(artifacts["onnx"]).run(feeds)["y"], **TOL)


def test_run_npz_bad_inputs(artifacts, tmp_path):
    out = tmp_path / "out.npz"
    with pytest.raises(ConfigError, match="cannot read it as an .npz"):
        run_npz(artifacts["onnx"], tmp_path / "missing.npz", out)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), ids=np.zeros(2, np.int64))
    with pytest.raises(ConfigError, match="cannot read it as an .npz"):  # never unpickled
        run_npz(artifacts["onnx"], tmp_path / "obj.npz", out)
    np.savez(tmp_path / "extra.npz", **_feeds(), label=np.zeros(2))
    with pytest.raises(InputMismatchError, match=r"unexpected \['label'\]"):
        run_npz(artifacts["tvm"], tmp_path / "extra.npz", out)
    assert not out.exists()


def test_bench_reports_sane_numbers(artifacts):
    t = bench(open_artifact(artifacts["tvm"]), warmup=1, iters=5)
    assert t["iters"] == 5 and 0 < t["median_ms"] <= t["p90_ms"] and t["mean_ms"] > 0
    assert bench(artifacts["onnx"], budget_s=0.05)["iters"] >= 3  # a path is opened; random inputs
    with pytest.raises(ConfigError, match="iters must be >= 1"):
        bench(artifacts["onnx"], iters=0)


def test_compare_interleaves_both(artifacts, tmp_path):
    c = compare(artifacts["tvm"], artifacts["onnx"], _feeds(), warmup=1, iters=4)
    assert c["iters"] == c["baseline_iters"] == 4
    assert c["ratio"] == pytest.approx(c["median_ms"] / c["baseline_median_ms"]) and c["ratio"] > 0
    other = export_onnx(make_model(torch.nn.Linear(4, 3), (torch.randn(2, 4),), ("a",)), tmp_path / "o.onnx")
    with pytest.raises(InputMismatchError, match=r"inputs \['x', 'ids'\], baseline takes \['a'\]"):
        compare(artifacts["onnx"], other)


def test_random_inputs_follow_specs():
    specs = [
        TensorSpec("tok", (1, "seq"), "int64", example_shape=(1, 7), value_range=(3, 5)),
        TensorSpec("mask", ("b", 4), "bool"),
        TensorSpec("x", (2, "?"), "float16"),
    ]
    got = random_inputs(specs)
    assert got["tok"].shape == (1, 7) and got["tok"].dtype == np.int64
    assert got["tok"].min() >= 3 and got["tok"].max() <= 5
    assert got["mask"].shape == (1, 4) and got["mask"].dtype == np.bool_
    assert got["x"].shape == (2, 1) and got["x"].dtype == np.float16
    assert all(s.mismatch(got[s.name]) is None for s in specs)
