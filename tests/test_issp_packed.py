"""Sparse weights from issp are stored packed in the ONNX artifact (non-zeros + 1-bit mask), decoded by
standard ONNX ops so onnxruntime runs the file unchanged; dense models export as before; the CLI report
states the storage compression."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import regc
from regc.backends.onnx_export import export_onnx
from regc.cli import main
from regc.zoo import mlp

WEIGHTS = ("fc1.weight", "fc2.weight", "fc3.weight")


@pytest.fixture(scope="module")
def sparse_mlp():
    torch.manual_seed(0)
    z = mlp()
    model = regc.capture(z.module, z.example_inputs, z.dynamic_shapes)
    data = regc.Dataset({"x": torch.randn(64, 32)}, torch.randint(0, 10, (64,)))
    ctx = regc.PassContext(train=regc.TrainSpec(data=data, lr=1e-2, steps=20, batch_size=16))
    model, records = regc.Pipeline.parse("issp{sparsity=0.8,skip_first_last=false}").run(model, ctx)
    return model, records[0]["stats"]


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _run_ort(path, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


def check_packed(inits: dict, name: str, w: np.ndarray) -> int:
    nnz = int((w != 0).sum())
    assert name not in inits  # the dense tensor is gone from the file
    assert inits[f"{name}__nz"].dtype == np.float32 and inits[f"{name}__nz"].size == nnz
    assert inits[f"{name}__bits"].dtype == np.uint8 and inits[f"{name}__bits"].size == math.ceil(w.size / 8)
    np.testing.assert_array_equal(inits[f"{name}__nz"], w.reshape(-1)[w.reshape(-1) != 0])
    assert inits[f"{name}__nz"].nbytes + inits[f"{name}__bits"].nbytes == 4 * nnz + math.ceil(w.size / 8)
    stored = sum(a.nbytes for k, a in inits.items() if k.startswith(f"{name}__"))
    assert stored - (4 * nnz + math.ceil(w.size / 8)) == 8 * (w.ndim + 1)  # + slice end and shape (int64)
    assert stored < 0.4 * w.nbytes  # 80% sparse: ~0.2 + 1/32 of dense fp32
    return stored


def test_sparse_weights_stored_packed_and_run_exactly(sparse_mlp, tmp_path):
    model, issp_stats = sparse_mlp
    storage = export_onnx(model, tmp_path / "sparse.onnx")
    inits = _inits(tmp_path / "sparse.onnx")
    stored = ideal = 0
    for name in WEIGHTS:
        w = model.get_tensor(name).detach().numpy()
        assert abs((w == 0).mean() - 0.8) < 0.01
        stored += check_packed(inits, name, w)
        ideal += 4 * int((w != 0).sum()) + w.size / 8
        np.testing.assert_array_equal(inits[name.replace("weight", "bias")],  # biases stay dense
                                      model.get_tensor(name.replace("weight", "bias")).detach().numpy())
    shared = sum(a.nbytes for k, a in inits.items() if k.startswith("regc_sparse_"))
    assert stored + shared == pytest.approx(ideal, rel=0.03)  # all bytes the packing wrote
    assert set(storage["layers"]) == set(WEIGHTS)
    assert storage["bytes_packed"] == issp_stats["storage"]["bytes_packed"]
    assert storage["compression"] == pytest.approx(issp_stats["storage"]["compression"], rel=1e-3)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "sparse.onnx")).metadata_props}
    assert json.loads(meta["regc.sparse_storage"])["bytes_packed"] == storage["bytes_packed"]
    x = torch.randn(16, 32)  # a batch size other than the example's: dynamic dims kept
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run_ort(tmp_path / "sparse.onnx", x), want, rtol=0, atol=1e-6)
    with torch.no_grad():  # regc's own ONNX importer reads the packed file back
        back = regc.load(str(tmp_path / "sparse.onnx"))(x).numpy()
    np.testing.assert_allclose(back, want, rtol=0, atol=1e-6)


def test_dense_model_export_unchanged(sparse_mlp, tmp_path):
    model, _ = sparse_mlp
    dense = model.clone()
    dense.annotations.clear()  # same (sparse) values, no issp annotation: nothing is packed
    assert export_onnx(dense, tmp_path / "dense.onnx") == {}
    proto = onnx.load(str(tmp_path / "dense.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert set(inits) == {n for n, _ in dense.named_parameters()}
    assert [n.op_type for n in proto.graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert "regc.sparse_storage" not in {p.key for p in proto.metadata_props}
    x = torch.randn(8, 32)
    np.testing.assert_array_equal(_run_ort(tmp_path / "dense.onnx", x), _run_ort(_export(model, tmp_path), x))
    init_bytes = {k: sum(a.nbytes for a in _inits(tmp_path / f"{k}.onnx").values())
                  for k in ("dense", "sparse")}
    assert init_bytes["sparse"] < 0.3 * init_bytes["dense"]  # 80% sparse fp32 + 1 bit/weight: ~0.24
    size = {k: (tmp_path / f"{k}.onnx").stat().st_size for k in ("dense", "sparse")}
    assert size["sparse"] < 0.6 * size["dense"]  # the file: + graph, node names and metadata


def _export(model, tmp_path):
    export_onnx(model, tmp_path / "sparse.onnx")
    return tmp_path / "sparse.onnx"


def test_cli_report_states_storage_compression(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32),
             labels=np.random.default_rng(1).integers(0, 10, 64))
    (tmp_path / "train.json").write_text(json.dumps({"data": "train.npz", "steps": 10, "batch_size": 16}))
    out = tmp_path / "out"
    assert main(["compile", "regc.zoo:mlp", "-p", "issp{sparsity=0.8}", "--train",
                 str(tmp_path / "train.json"), "-o", str(out), "-q", "--no-bench"]) == 0
    report = json.loads((out / "report.json").read_text())
    storage = report["passes"][0]["stats"]["storage"]
    assert storage["compression"] > 2.5 and "storage only" in storage["note"]
    inits = _inits(out / "model.onnx")
    assert "fc2.weight" not in inits and "fc2.weight__bits" in inits  # the middle layer, packed
    assert "fc1.weight" in inits and "fc3.weight" in inits  # first/last skipped by issp: dense
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["regc.sparse_storage"])["bytes_packed"] == storage["bytes_packed"]
