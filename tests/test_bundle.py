"""Edge bundles: an aarch64 bundle run under qemu matches the x86 one, the manifest hashes every file,
tampering is caught by `regc run`, and missing tools raise typed errors naming the apt package."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

import regc
from regc.cli import main
from regc.errors import ConfigError, LoweringError, ModelFormatError
from regc.runtime import _bundle_native
from regc.runtime.artifact import open_artifact
from regc.runtime._bundle_sfx import pack_single_file, read_manifest
from regc.runtime.bundle import BundleRunner, SingleFileRunner, export_bundle, verify_bundle
from regc.zoo import bert_encoder, digits_cnn, digits_data

_ELF_MACHINE = {"x86_64": 62, "aarch64": 183}  # e_machine in the ELF header


def _digits_quant() -> tuple[regc.Model, dict[str, np.ndarray]]:
    z = digits_cnn()
    m = regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                     output_names=z.output_names)
    d = digits_data()
    calib = regc.Dataset({"image": d.x_train[:128]}, d.y_train[:128])
    q = regc.compress(regc.compress(m, "fold_bn"), "quant{speed_check=false,calib_samples=128}", data=calib)
    return q, {"image": d.x_test[:32].numpy()}


def _bert() -> tuple[regc.Model, dict[str, np.ndarray]]:
    z = bert_encoder()
    m = regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                     output_names=z.output_names)
    return m, {n: t.numpy() for n, t in zip(z.input_names, z.example_inputs, strict=True)}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, one_thread):
    """kind -> (model, inputs, x86 bundle, aarch64 bundle), built once per module. The x86 bundle goes
    through `regc export` from a saved TVM folder, the aarch64 one through the Python API."""
    built = {}

    def get(kind: str):
        if kind not in built:
            model, inputs = {"digits_quant": _digits_quant, "bert": _bert}[kind]()
            root = tmp_path_factory.mktemp(kind)
            regc.lower(model, "x86_64").save(root / "compiled" / "x86_64")
            assert main(["export", str(root / "compiled"), "-t", "x86_64", "-o", str(root / "x86")]) == 0
            built[kind] = (model, inputs, root / "x86", export_bundle(model, "aarch64", root / "a64"))
        return built[kind]

    return get


def check_elf(path: Path, arch: str) -> None:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == _ELF_MACHINE[arch], path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["digits_quant", "bert"])
def test_aarch64_bundle_under_qemu_matches_x86(bundles, kind):
    model, inputs, x86, a64 = bundles(kind)
    for bundle, arch in ((x86, "x86_64"), (a64, "aarch64")):
        for f in ("model.so", "regc_run", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"):
            check_elf(bundle / f, arch)
    want = model(*(torch.from_numpy(a) for a in inputs.values())).detach().numpy()
    got_x86 = open_artifact(x86).run(inputs)
    got_a64 = open_artifact(a64).run(inputs)
    name = model.output_names[0]
    assert got_a64[name].shape == want.shape and got_a64[name].dtype == np.float32
    np.testing.assert_allclose(got_x86[name], want, rtol=1e-4, atol=1e-4)  # TVM vs torch kernels
    np.testing.assert_allclose(got_a64[name], got_x86[name], rtol=1e-5, atol=1e-5)
    params = {p["name"]: p["dtype"] for p in json.loads((a64 / "manifest.json").read_text())["params"]}
    if kind == "digits_quant":  # what was lowered: all three layers as int8 codes, no float copy
        assert {n for n, dt in params.items() if dt == "int8"} == {
            "features_0_weight_q", "features_4_weight_q", "classifier_weight_q"}
        assert not {"features.0.weight", "features.4.weight", "classifier.weight"} & set(params)
        assert (got_a64[name].argmax(1) == digits_data().y_test[:32].numpy()).mean() >= 0.9


@pytest.mark.slow
def test_manifest_hashes_every_file_and_describes_the_model(bundles):
    model, _, _, a64 = bundles("bert")
    manifest = json.loads((a64 / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(a64).as_posix() for p in a64.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in on_disk if f != "manifest.json"]
    assert sorted(manifest["files"]) == ["lib/libtvm_ffi.so", "lib/libtvm_runtime.so", "model.params",
                                         "model.so", "regc_run"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((a64 / name).read_bytes()).hexdigest() == digest
    assert manifest["target"] == "aarch64" and manifest["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert [s["name"] for s in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert [s["dtype"] for s in manifest["inputs"]] == ["int64", "int64"]
    assert [s["name"] for s in manifest["outputs"]] == ["last_hidden_state"]
    assert {p["name"] for p in manifest["params"]} >= {n for n, _ in model.named_parameters()}
    assert set(manifest["versions"]) >= {"tvm", "tvm_ffi", "regc"}
    # weights stay out of the code: the .so is smaller than the weights it reads
    assert (a64 / "model.so").stat().st_size < (a64 / "model.params").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("tamper", ["flip model.params", "flip regc_run", "remove lib/libtvm_ffi.so",
                                    "add extra.so"])
def test_regc_run_detects_a_tampered_bundle(bundles, tmp_path, capsys, tamper):
    _, inputs, _, a64 = bundles("bert")
    bundle = shutil.copytree(a64, tmp_path / "b")
    np.savez(tmp_path / "in.npz", **inputs)
    run = ["run", str(bundle), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz")]
    assert main(run) == 0  # the untouched copy runs
    with np.load(tmp_path / "out.npz") as f:
        assert f["last_hidden_state"].shape == (2, 16, 64)
    action, name = tamper.split()
    if action == "flip":
        data = bytearray((bundle / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / name).write_bytes(bytes(data))
    elif action == "remove":
        (bundle / name).unlink()
    else:
        (bundle / name).write_bytes(b"\x7fELF")
    capsys.readouterr()
    assert main(run) == ModelFormatError.exit_code
    err = capsys.readouterr().err
    assert "ModelFormatError" in err and name in err
    if action == "flip":  # the runner on the target checks the files itself (a missing lib: ld.so says)
        (tmp_path / "i").mkdir()
        np.save(tmp_path / "i" / "0.npy", inputs["input_ids"])
        np.save(tmp_path / "i" / "1.npy", inputs["attention_mask"])
        cmd = ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(bundle / "regc_run"), str(bundle),
               str(tmp_path / "i"), str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 2 and name in proc.stderr, proc.stderr
        assert not (tmp_path / "0.npy").exists()


def test_export_and_run_cli_on_a_native_bundle(tmp_path, capsys):
    from regc.zoo import mlp

    z = mlp()
    bundle = tmp_path / "mlp"
    assert main(["export", "regc.zoo:mlp", "-t", "x86_64", "-o", str(bundle)]) == 0
    assert "x86_64 bundle, 5 files" in capsys.readouterr().out
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))  # batch 5: the dynamic dim
    np.savez(tmp_path / "in.npz", x=x.numpy())
    run = ["run", str(bundle), "--outputs", str(tmp_path / "o.npz"), "--inputs"]
    assert main([*run, str(tmp_path / "in.npz")]) == 0
    with np.load(tmp_path / "o.npz") as f:
        np.testing.assert_allclose(f["logits"], z.module(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    check_elf(bundle / "regc_run", "x86_64")
    one = tmp_path / "mlp.run"
    assert main(["export", "regc.zoo:mlp", "-t", "x86_64", "-o", str(bundle), "--single-file"]) == 2
    assert "exists and is not a regc single-file bundle" in capsys.readouterr().err
    assert (bundle / "manifest.json").is_file()  # the folder it refused to overwrite is intact
    assert main(["export", "regc.zoo:mlp", "-t", "x86_64", "-o", str(one), "--single-file"]) == 0
    assert "x86_64 single-file bundle" in capsys.readouterr().out
    assert main(["run", str(one), "--outputs", str(tmp_path / "o1.npz"), "--inputs", str(tmp_path / "in.npz")]) == 0
    with np.load(tmp_path / "o.npz") as f, np.load(tmp_path / "o1.npz") as g:
        np.testing.assert_array_equal(f["logits"], g["logits"])
    np.savez(tmp_path / "bad.npz", x=x.numpy().astype(np.float64))  # checked before the runner starts
    assert main([*run, str(tmp_path / "bad.npz")]) == 2
    assert "input 'x' has dtype float64, expected float32" in capsys.readouterr().err


@pytest.mark.slow
def test_single_file_bundle_runs_like_the_folder_and_cleans_up(bundles, tmp_path, monkeypatch):
    _, inputs, x86, a64 = bundles("bert")
    extract = tmp_path / "extract"
    extract.mkdir()
    monkeypatch.setenv("REGC_TMPDIR", str(extract))
    for folder, arch in ((x86, "x86_64"), (a64, "aarch64")):
        manifest = verify_bundle(folder)
        one = pack_single_file(folder, manifest, tmp_path / f"bert-{arch}.run")
        check_elf(one, arch)
        payload = sum((folder / f).stat().st_size for f in [*manifest["files"], "manifest.json"])
        assert payload < one.stat().st_size < payload + 2_000_000  # the launcher adds < 2 MB
        assert read_manifest(one) == manifest
        runner = open_artifact(one)
        assert isinstance(runner, SingleFileRunner)
        got, want = runner.run(inputs), open_artifact(folder).run(inputs)
        np.testing.assert_array_equal(got["last_hidden_state"], want["last_hidden_state"])  # same binaries
        assert list(extract.iterdir()) == []  # the extracted folder is removed after each run


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate", "unsafe name"])
def test_single_file_bundle_refuses_damage(bundles, tmp_path, damage):
    _, inputs, x86, _ = bundles("bert")
    one = pack_single_file(x86, verify_bundle(x86), tmp_path / "bert.run")
    data = bytearray(one.read_bytes())
    entries = _payload_entries(bytes(data))
    if damage == "flip a weight byte":  # caught by regc_run's sha256 check of the extracted model.params
        data[entries["model.params"][1] + 100] ^= 0x01
        want = "model.params"
    elif damage == "truncate":
        data = data[:-100] + data[-24:]
        want = "corrupt single-file bundle"
    else:
        at = entries["manifest.json"][0]
        data[at:at + 13] = b"../../evil.sh"
        want = "unsafe file name '../../evil.sh'"
    one.write_bytes(bytes(data))
    (tmp_path / "i").mkdir()
    for i, name in enumerate(("input_ids", "attention_mask")):
        np.save(tmp_path / "i" / f"{i}.npy", inputs[name])
    proc = subprocess.run([str(one), str(tmp_path / "i"), str(tmp_path)], capture_output=True, text=True,
                          env={"REGC_TMPDIR": str(tmp_path / "i")})
    assert proc.returncode == 2 and want in proc.stderr, proc.stderr
    assert not (tmp_path / "0.npy").exists() and not (tmp_path / "evil.sh").exists()
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["0.npy", "1.npy"]  # nothing left behind


def _payload_entries(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset of the name, offset of the bytes) of each file in a single-file bundle."""
    start, count, _, magic = struct.unpack("<QII8s", data[-24:])
    assert magic == b"REGCSFX1"
    found, at = {}, start
    for _ in range(count):
        (n,) = struct.unpack("<H", data[at:at + 2])
        _, size = struct.unpack("<IQ", data[at + 2 + n:at + 14 + n])
        found[data[at + 2:at + 2 + n].decode()] = (at + 2, at + 14 + n)
        at += 14 + n + size
    assert at == len(data) - 24
    return found


def _fake_bundle(folder: Path, arch: str) -> Path:
    """A manifest-only bundle (no files to verify) for error-path tests."""
    folder.mkdir()
    spec = {"name": "x", "shape": [2], "dtype": "float32"}
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "arch": arch, "files": {},
                                                      "inputs": [spec], "outputs": [spec]}))
    return folder


def test_missing_tools_raise_errors_naming_the_apt_package(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda exe: None if "aarch64" in exe else real_which(exe))
    with pytest.raises(LoweringError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        export_bundle(None, "aarch64", tmp_path / "never")  # fails before reading the source
    with pytest.raises(LoweringError, match="apt-get install qemu-user-static"):
        BundleRunner(_fake_bundle(tmp_path / "fake", "aarch64"))
    assert not (tmp_path / "never").exists()


def test_wheel_download_failure_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once instead of reaching PyPI
    with pytest.raises(LoweringError, match="could not download the aarch64 TVM runtime wheels apache-tvm=="):
        _bundle_native.fetch_wheels(_bundle_native.ARCHES["aarch64"], tmp_path)
    assert list((tmp_path / "wheels-aarch64").iterdir()) == []


def test_bad_export_arguments_are_config_errors(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="'riscv' is not supported"):
        export_bundle(None, "riscv", tmp_path / "b")
    with pytest.raises(ConfigError, match="exists and is not a regc bundle"):
        export_bundle(None, "x86_64", tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a compiled TVM folder"):
        export_bundle(tmp_path / "empty", "x86_64", tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]  # no partial bundle left


def test_runner_source_ships_as_package_data():
    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = cfg.get("package-data", {}).get("regc.runtime", [])
    assert any(fnmatch("regc_run.cc", p) for p in patterns), "add regc.runtime = ['*.cc'] to package-data"
    assert _bundle_native.RUNNER_SOURCE.is_file()
