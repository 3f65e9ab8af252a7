"""The ONNX importer: typed refusals of bad files, and lossless import of real exports.

Lossless import is checked both ways: outputs equal onnxruntime's within 1e-5 (fp32), and the graph
is what passes expect (trainable parameters that receive gradients, aten.linear / aten.batch_norm,
untied copies of shared initializers, dynamic batch).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from regc import (
    InputMismatchError,
    Model,
    ModelFormatError,
    UnsafePathError,
    UnsupportedDtypeError,
    UnsupportedOpError,
)
from regc.frontend.onnx_import import constant_input_names, load_onnx, supported_ops

ATOL = 1e-5


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),
    opset: int = 18,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _ort(path: Path, *xs: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs, strict=False)})


def _linear_model(rows: int = 4, cols: int = 3) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(rows * cols, dtype=np.float32).reshape(cols, rows), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", rows])],
        [w],
    )


# ---- bad input: each a typed error that says what to do ------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not found"):
        load_onnx(tmp_path / "absent.onnx")


def test_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "text.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 20)
    with pytest.raises(ModelFormatError, match="re-export"):
        load_onnx(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    data = _linear_model(64, 64).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFormatError, match="truncated"):
        load_onnx(path)


def _external_model(tmp_path: Path, location: str) -> Path:
    """A model whose weight claims to live in ``location`` (the data file is never written)."""
    model = _linear_model()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    folder = tmp_path / "model"
    folder.mkdir()
    return _save(model, folder / "m.onnx")


@pytest.mark.parametrize(
    "location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link/secret.bin"]
)
def test_external_data_outside_folder_refused_before_reading(
    tmp_path: Path, location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    path = _external_model(tmp_path, location)
    os.symlink(tmp_path, path.parent / "link")  # a symlink inside the folder that leads out of it

    def must_not_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("external data was read before its location was checked")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", must_not_read)
    with pytest.raises(UnsafePathError, match="outside the model's folder") as err:
        load_onnx(path)
    assert location in str(err.value)


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    model = _linear_model()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(
        model,
        str(folder / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(
        load_onnx(folder / "m.onnx")(torch.from_numpy(x)).detach().numpy(), x @ weight, rtol=1e-6
    )


def test_missing_external_data_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="external data"):
        load_onnx(_external_model(tmp_path, "weights.bin"))


def test_unknown_op_is_named(tmp_path: Path) -> None:
    node = helper.make_node("FancyOp", ["x"], ["y"], name="my_node", domain="com.example")
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(_save(model, tmp_path / "m.onnx"))
    assert err.value.op == "FancyOp"
    for part in ("FancyOp", "com.example", "my_node", "opset 18", "supported_ops()"):
        assert part in str(err.value)


@pytest.mark.parametrize(
    "elem",
    [
        TensorProto.FLOAT8E4M3FN,
        TensorProto.STRING,
        TensorProto.UINT32,
        TensorProto.COMPLEX64,
        TensorProto.INT4,
    ],
)
def test_unsupported_dtype(tmp_path: Path, elem: int) -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", elem, [2])],
        [helper.make_tensor_value_info("y", elem, [2])],
    )
    with pytest.raises(UnsupportedDtypeError, match=TensorProto.DataType.Name(elem)):
        load_onnx(_save(model, tmp_path / "m.onnx"))


def test_shape_input_needs_constant_inputs(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    path = _save(model, tmp_path / "m.onnx")
    assert constant_input_names(path) == {"shape": "Reshape input 1"}
    with pytest.raises(UnsupportedOpError, match="constant_inputs"):
        load_onnx(path)
    m = load_onnx(path, constant_inputs={"shape": np.array([3, 4])})
    assert m.input_names == ["x"]
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(m(x), x.reshape(3, 4))
    with pytest.raises(InputMismatchError):
        load_onnx(path, constant_inputs={"nope": np.array([3, 4])})


def test_dim_pinned_by_the_graph_is_static(tmp_path: Path) -> None:
    """A symbolic dim that the graph fixes (Reshape to a constant size) is static in the Model, and
    other sizes are refused up front rather than failing a guard inside the graph."""
    shape = numpy_helper.from_array(np.array([6], dtype=np.int64), "shape")
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
        [shape],
    )
    m = load_onnx(_save(model, tmp_path / "m.onnx"))
    assert m.dynamic_shapes is None
    assert torch.equal(m(torch.ones(2, 3)), torch.ones(6))
    with pytest.raises(InputMismatchError, match="dim 0 is static"):
        m(torch.ones(4, 3))


def test_supported_ops_cover_the_core_vocabulary() -> None:
    ops = set(supported_ops())
    assert len(ops) > 150
    assert {
        "Conv",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "LayerNormalization",
        "Resize",
        "QuantizeLinear",
        "DequantizeLinear",
        "Attention",
        "LSTM",
        "Loop",
        "Einsum",
    } <= ops


# ---- what the graph looks like ----------------------------------------------------------------------
def _targets(m: Model) -> set[object]:
    return {n.target for n in m.gm.graph.nodes if n.op == "call_function"}


def test_tied_initializers_are_untied(tmp_path: Path) -> None:
    """One initializer read by two MatMuls becomes two parameters that both map to its ONNX name."""
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "shared")
    model = _model(
        [
            helper.make_node("MatMul", ["x", "shared"], ["a"]),
            helper.make_node("MatMul", ["a", "shared"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    m = load_onnx(_save(model, tmp_path / "m.onnx"))
    params = dict(m.named_parameters())
    assert len(params) == 2 and sorted(m.param_names.values()) == ["shared", "shared"]
    first, second = params.values()
    with torch.no_grad():
        first.mul_(2.0)
    assert torch.equal(second, torch.eye(3))
    x = torch.randn(2, 3)
    torch.testing.assert_close(m(x), 2 * x)


def test_gemm_becomes_linear_and_batch_norm_flips_to_training(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), name)
        for name, s in (("B", (3, 4)), ("C", (4,)), ("scale", (4,)), ("bias", (4,)), ("mean", (4,)))
    ]
    init.append(numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"))
    model = _model(
        [
            helper.make_node("Gemm", ["x", "B", "C"], ["g"]),
            helper.make_node("BatchNormalization", ["g", "scale", "bias", "mean", "var"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        init,
    )
    path = _save(model, tmp_path / "m.onnx")
    m = load_onnx(path)
    assert {torch.ops.aten.linear.default, torch.ops.aten.batch_norm.default} <= _targets(m)
    assert sorted(n for n, _ in m.named_parameters()) == ["B", "C", "bias", "scale"]  # B stored as [out, in]
    assert sorted(n for n, _ in m.gm.named_buffers()) == ["mean", "var"]
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), _ort(path, x)[0], atol=ATOL)
    assert not m.training and m.train_mode(True).training


# ---- real exports -----------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


def _export(module: nn.Module, example: torch.Tensor, dims: dict[int, torch.export.Dim], path: Path) -> Path:
    torch.manual_seed(0)
    for mod in module.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            program = torch.onnx.export(
                module.eval(), (example,), dynamo=True, dynamic_shapes=(dims,), optimize=False, verbose=False
            )
        finally:
            logging.disable(logging.NOTSET)
    program.save(str(path))
    return path


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(
        SmallCNN(),
        torch.randn(2, 3, 16, 16),
        {0: torch.export.Dim("batch")},
        tmp_path_factory.mktemp("cnn") / "cnn.onnx",
    )


@pytest.fixture(scope="module")
def block_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(
        TransformerBlock(),
        torch.randn(2, 8, 16),
        {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)},
        tmp_path_factory.mktemp("block") / "block.onnx",
    )


def _assert_trainable(m: Model, *example: torch.Tensor) -> None:
    params = dict(m.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    loss = m(*example).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert any(p.grad.abs().sum() > 0 for p in params.values())


@pytest.mark.slow
def test_cnn_export_matches_onnxruntime_at_any_batch(cnn_path: Path) -> None:
    m = load_onnx(cnn_path)
    assert m.origin == "onnx" and m.dynamic_shapes == {m.input_names[0]: {0: torch.export.Dim.DYNAMIC}}
    assert {
        torch.ops.aten.conv2d.default,
        torch.ops.aten.batch_norm.default,
        torch.ops.aten.linear.default,
    } <= _targets(m)
    assert {"conv1.weight", "fc.weight", "bn.weight"} <= set(m.param_names.values())
    rng = np.random.default_rng(1)
    for batch in (1, 2, 5):
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), _ort(cnn_path, x)[0], atol=ATOL)
    _assert_trainable(m, torch.from_numpy(rng.standard_normal((4, 3, 16, 16)).astype(np.float32)))


@pytest.mark.slow
def test_transformer_block_export_matches_onnxruntime(block_path: Path) -> None:
    m = load_onnx(block_path)
    assert set(m.dynamic_shapes[m.input_names[0]]) == {0, 1}
    assert torch.ops.aten.layer_norm.default in _targets(m)
    rng = np.random.default_rng(2)
    for batch, seq in ((2, 8), (3, 5), (1, 11)):
        x = rng.standard_normal((batch, seq, 16)).astype(np.float32)
        np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), _ort(block_path, x)[0], atol=ATOL)
    _assert_trainable(m, torch.from_numpy(rng.standard_normal((2, 6, 16)).astype(np.float32)))
