"""The CLI end to end: compile -> run matches onnxruntime on the original; bad input fails cleanly."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import regc
from regc.cli import main


def _ort(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory):
    from regc.zoo import resnet18_style

    z = resnet18_style()
    path = tmp_path_factory.mktemp("resnet") / "resnet.onnx"
    regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                 output_names=z.output_names).save(str(path))
    x = z.example_inputs[0]
    return path, z.input_names[0], x


def _compile(args, capsys=None):
    rc = main(args)
    return rc


@pytest.mark.slow
def test_compile_fold_bn_x86_matches_onnxruntime(resnet_onnx, tmp_path, capsys):
    path, name, x = resnet_onnx
    data = tmp_path / "calib.npz"
    xs = torch.randn(8, *x.shape[1:]).numpy()
    np.savez(data, **{name: xs})
    out = tmp_path / "out"
    assert main(["compile", str(path), "--passes", "fold_bn", "-t", "x86_64", "--data", str(data),
                 "-o", str(out), "-q"]) == 0
    stdout = capsys.readouterr().out
    assert "size:" in stdout and "latency" in stdout and "report.json" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["pass"] == "fold_bn"  # torch's ONNX export already folded BN here
    ref = _ort(path, {name: xs})[0]
    np.savez(tmp_path / "in.npz", **{name: xs})
    for artifact in (out / "model.onnx", out / "x86_64"):
        assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz"),
                     "--outputs", str(tmp_path / "o.npz")]) == 0
        with np.load(tmp_path / "o.npz") as z:
            got = z[z.files[0]]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compile_module_function_folds_bn(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "regc.zoo:resnet18_style", "-p", "fold_bn", "-o", str(out), "-q", "--no-bench"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["stats"]["folded"] == 20 and report["passes"][0]["modified"]
    assert report["size"]["params_after"] < report["size"]["params_before"]
    assert report["origin"] == "torch" and (out / "model.onnx").is_file()


def _bad_onnx_unknown_op(path):
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.example", 1)]), path)


def _traversal_onnx(path):
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2])
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../../../etc/passwd")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def _truncated(path, good):
    blob = good.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


@pytest.mark.parametrize("case,pipeline,err,match", [
    ("missing", "fold_bn", "ModelFormatError", "not found"),
    ("not_onnx", "fold_bn", "ModelFormatError", ""),
    ("truncated", "fold_bn", "ModelFormatError", ""),
    ("traversal", "fold_bn", "UnsafePathError", ""),
    ("unknown_op", "fold_bn", "UnsupportedOpError", "FancyOp"),
    ("good", "fold_bm", "PipelineError", "Did you mean 'fold_bn'"),
    ("good", "canonicalize{x=1}", "ConfigError", "unknown option 'x'"),
    ("good", "fold_bn{bogus=1}", "ConfigError", "unknown option"),
])
def test_bad_input_fails_cleanly(tmp_path, capsys, case, pipeline, err, match):
    good = tmp_path / "good.onnx"
    regc.capture(torch.nn.Linear(3, 2), (torch.randn(1, 3),)).save(str(good))
    model = tmp_path / f"{case}.onnx"
    if case == "not_onnx":
        model.write_text("this is not a protobuf\n")
    elif case == "truncated":
        _truncated(model, good)
    elif case == "traversal":
        _traversal_onnx(model)
    elif case == "unknown_op":
        _bad_onnx_unknown_op(model)
    elif case == "good":
        model = good
    out = tmp_path / "out"
    rc = main(["compile", str(model), "--passes", pipeline, "-o", str(out), "-q"])
    msg = capsys.readouterr().err
    assert rc != 0
    assert msg.startswith(f"regc: error: {err}") and match in msg, msg
    assert len(msg.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*")), "a failed compile must leave nothing"


def test_unknown_target_fails_before_loading(tmp_path, capsys):
    assert main(["compile", "missing.onnx", "-p", "canonicalize{}", "-t", "x86", "-o", str(tmp_path / "o")]) != 0
    assert "unknown target 'x86'" in capsys.readouterr().err


def test_run_input_shape_mismatch(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    regc.capture(torch.nn.Linear(3, 2), (torch.randn(1, 3),)).save(str(path))
    np.savez(tmp_path / "in.npz", input=np.zeros((1, 4), np.float32))
    rc = main(["run", str(path), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert rc != 0 and "InputMismatchError" in err and "input" in err
    assert not (tmp_path / "o.npz").exists()


def test_passes_and_inspect_listing(tmp_path, capsys):
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "fold_bn" in listing and "canonicalize" in listing
    assert main(["passes", "lowrnk"]) != 0
    path = tmp_path / "m.onnx"
    regc.capture(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()), (torch.randn(1, 3),)).save(str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 16 and info["op_classes"]["linear-like"] == 1


def test_real_exit_code_in_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "regc.cli", "compile", str(tmp_path / "nope.onnx"), "-p",
                           "fold_bn", "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("regc: error: ModelFormatError")
