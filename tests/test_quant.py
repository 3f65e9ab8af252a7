"""`quant`: int8 weights and activations, checked on both axes.

What changed: int8 buffers, quantizers and integer linears in the graph, QuantizeLinear and
MatMulIntegerToFloat (convs: QDQ) in the ONNX file, and int8 kernels (MatMulIntegerToFloat,
QLinearConv, DynamicQuantizeMatMul) in onnxruntime's optimized graph. What was kept: weights on the
integer grid quantize exactly, the symmetric-int8 bound |dy_j| <= s_j/2 ||x||_1 holds on random
inputs, onnxruntime agrees with the torch simulation, and model-level floors (digits accuracy, output
cosine) hold.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import regc
from regc.errors import ConfigError
from regc.passes import quant as quant_mod
from regc.pipeline import parse_pipeline
from regc.registry import PassContext
from regc.zoo import accuracy, digits_cnn, digits_data
from tests.conftest import capture_zoo, zoo_dataset

qd = torch.ops.quantized_decomposed


def _run(model, text, data=None):
    out, records = parse_pipeline(text).run(model, PassContext(data=data))
    json.dumps(records[0]["stats"])
    return out, records[0]["stats"]


def _ort(path, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


class _Linear(torch.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(x)


def _linear_model(w, b, batch=5):
    return regc.capture(_Linear(w, b), (torch.randn(batch, w.shape[1]),), {"x": {0: torch.export.Dim("b")}})


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_weights_on_the_grid_quantize_exactly(weights):
    g = torch.Generator().manual_seed(0)
    k = torch.randint(-127, 128, (16, 32), generator=g).float()
    k[:, 0] = 127  # every row reaches the top code, so max|w| / 127 is the grid step
    s = torch.rand(16, 1, generator=g) + 0.5 if weights == "per_channel" else torch.tensor(0.25)
    m = _linear_model(k * s, torch.randn(16, generator=g))
    x = torch.randn(7, 32, generator=g)
    ref = m(x)
    q, stats = _run(m, f"quant{{acts=none,weights={weights},reduce_range=off,speed_check=false}}")
    assert stats["quantized"] == 1 and stats["layers"]["fc.weight"]["format"] == "int8"
    codes = [t for n, t in q.gm.named_buffers() if t.dtype == torch.int8]
    assert len(codes) == 1 and torch.equal(codes[0].float().abs().amax(), torch.tensor(127.0))
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_weight_error_within_symmetric_int8_bound(weights):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g)
    m = _linear_model(w, torch.zeros(24))
    x = torch.randn(50, 40, generator=g)
    ref = m(x)
    q, stats = _run(m, f"quant{{acts=none,weights={weights},reduce_range=off,speed_check=false}}")
    dy = (q(x) - ref).abs()
    s = w.abs().amax(1) / 127 if weights == "per_channel" else w.abs().amax().expand(24) / 127
    bound = s[None, :] / 2 * x.abs().sum(1, keepdim=True)
    assert (dy <= bound * (1 + 1e-5) + 1e-6).all()
    assert dy.max() > 0  # not a no-op: the weights are really rounded
    assert stats["weight_bytes"]["after"] < stats["weight_bytes"]["before"] / 2


@pytest.mark.slow
def test_bert_static_int8_runs_as_int8_matmuls_in_onnxruntime(tmp_path):
    model = capture_zoo("bert_encoder")
    data = zoo_dataset(model, n=16)
    xs = data.batch(0, 4, like=model.example_inputs)
    with torch.no_grad():
        ref = model(*xs)
    q, stats = _run(model, "quant{speed_check=false}", data)
    linears = [n for n, v in stats["layers"].items() if v["op"] == "linear"]
    embeddings = [n for n, v in stats["layers"].items() if v["op"] == "embedding"]
    assert len(linears) == 12 and len(embeddings) == 2 and stats["quantized"] == 14 and not stats["float"]
    assert stats["smoothquant"]["layernorms"] > 0
    for v in stats["layers"].values():
        assert v["sensitivity_sqnr_db"] is not None and v["sensitivity_sqnr_db"] > 10
    with torch.no_grad():
        got = q(*xs)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99
    q.save(tmp_path / "q.onnx")
    exported = _ops(tmp_path / "q.onnx")
    assert exported["MatMulIntegerToFloat"] == 12 and exported["QuantizeLinear"] >= 1  # emitted directly
    inits = {i.name: i.data_type for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert sum(t == onnx.TensorProto.INT8 for t in inits.values()) >= 14
    sess = _ort(tmp_path / "q.onnx", tmp_path / "opt.onnx")
    assert _ops(tmp_path / "opt.onnx")["MatMulIntegerToFloat"] == 12
    feed = {n: x.numpy() for n, x in zip(q.input_names, xs, strict=True)}
    np.testing.assert_allclose(sess.run(None, feed)[0], got.numpy(), atol=0.05)


@pytest.mark.slow
def test_dynamic_acts_export_dynamic_quantize_linear(tmp_path):
    model = capture_zoo("bert_encoder")
    xs = model.example_inputs
    with torch.no_grad():
        ref = model(*xs)
    q, stats = _run(model, "quant{acts=dynamic,speed_check=false,embeddings=false}")
    assert all(v["activation"].startswith("dynamic") for v in stats["layers"].values())
    assert "embeddings" in " ".join(stats["unsupported"].values())
    with torch.no_grad():
        got = q(*xs)
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.99
    q.save(tmp_path / "q.onnx")
    assert _ops(tmp_path / "q.onnx")["DynamicQuantizeLinear"] >= 6
    sess = _ort(tmp_path / "q.onnx", tmp_path / "opt.onnx")
    opt = _ops(tmp_path / "opt.onnx")
    assert opt["DynamicQuantizeMatMul"] + opt["MatMulIntegerToFloat"] == 12
    feed = {n: x.numpy() for n, x in zip(q.input_names, xs, strict=True)}
    np.testing.assert_allclose(sess.run(None, feed)[0], got.numpy(), atol=0.05)


def _digits():
    m = capture_zoo(digits_cnn())
    d = digits_data()
    return regc.compress(m, "fold_bn"), d, regc.Dataset({"image": d.x_train[:256]}, d.y_train[:256])


def test_digits_cnn_one_uint8_chain_qgemm_and_accuracy(tmp_path):
    m, d, calib = _digits()
    acc_float = accuracy(m, d.x_test, d.y_test)
    b = m.get_tensor("classifier.bias").detach().clone()
    q, stats = _run(m, "quant{speed_check=false}", calib)
    assert [v["format"] for v in stats["layers"].values()] == ["int8"] * 3
    assert stats["calibration"]["metric"] == "accuracy"
    acc_q = accuracy(q, d.x_test, d.y_test)
    assert acc_q >= acc_float - 0.003
    # the rank-2 classifier has an int32 bias: |b_hat - b| <= s_x s_w / 2
    codes = [n for n, t in q.gm.named_buffers() if t.dtype == torch.int32]
    assert codes == ["classifier_bias_q"]
    bs = q.get_tensor("classifier_bias_scale")
    assert ((q.get_tensor("classifier_bias_q").float() * bs - b).abs() <= bs / 2 * 1.001).all()
    q.save(tmp_path / "q.onnx")
    sess = _ort(tmp_path / "q.onnx", tmp_path / "opt.onnx")
    opt = _ops(tmp_path / "opt.onnx")
    # one Q at the input, then uint8 end to end (pools included), the classifier as QGemm
    assert opt["QLinearConv"] == 2 and opt["QGemm"] == 1 and opt["QuantizeLinear"] == 1
    assert opt["DequantizeLinear"] == 0 and opt["Conv"] == opt["Gemm"] == opt["MaxPool"] == 0
    logits = sess.run(None, {"image": d.x_test.numpy()})[0]
    np.testing.assert_allclose(logits, q(d.x_test).detach().numpy(), atol=0.15)  # integer kernels round
    assert (logits.argmax(1) == d.y_test.numpy()).mean() >= acc_float - 0.003


def test_max_accuracy_drop_keeps_the_most_sensitive_layers_float():
    model = capture_zoo("mlp")
    data = zoo_dataset(model, n=64)
    data.labels = None  # no labels: the drop is 1 - mean output cosine, never exactly 0
    opts = "speed_check=false,calib=minmax,weights=per_tensor,bits=4,acts=dynamic"
    _, full = _run(model.clone(), f"quant{{{opts}}}", data)
    target = full["calibration"]["drop"] / 3
    q, stats = _run(model, f"quant{{{opts},max_accuracy_drop={target}}}", data)
    assert stats["float"], "a target below the all-int8 drop must keep some layers float"
    assert all("max_accuracy_drop" in r for r in stats["float"].values())
    assert stats["calibration"]["drop"] <= target
    sqnr = {n: v["sensitivity_sqnr_db"] for n, v in stats["layers"].items()}
    most_sensitive = min(sqnr, key=sqnr.get)
    assert most_sensitive in stats["float"] and stats["layers"][most_sensitive]["format"] == "float"
    kept = {n for n, v in stats["layers"].items() if v["format"] == "float"}
    assert kept == set(sorted(sqnr, key=sqnr.get)[:len(kept)])  # fallback goes in sensitivity order


def test_speed_check_keeps_layers_float_where_int8_loses(monkeypatch):
    model = capture_zoo("mlp")
    slow = {"n": 0}

    def fake_timing(layer, batch=None):
        slow["n"] += 1
        return (1.0, 2.0) if slow["n"] == 1 else (2.0, 1.0)

    monkeypatch.setattr(quant_mod, "time_layer", fake_timing)
    q, stats = _run(model, "quant{acts=dynamic}")
    first, *rest = stats["layers"].values()
    assert first["format"] == "float" and "slower" in first["reason"]
    assert first["onnxruntime_ms"] == {"float": 1.0, "int8": 2.0}
    assert all(v["format"] == "int8" for v in rest)


def test_speed_check_times_at_speed_batch_with_the_pool_in_front(monkeypatch):
    from regc.passes import _quant_speed

    m, _, calib = _digits()
    seen, real = [], _quant_speed._graph

    def spy(layer, x_shape, attrs, quantized, pool=None, relu=False):
        g = real(layer, x_shape, attrs, quantized, pool, relu)
        seen.append((layer.name, x_shape[0], [n.op_type for n in g.graph.node]))
        return g

    monkeypatch.setattr(_quant_speed, "_graph", spy)
    monkeypatch.setattr(_quant_speed, "_time", lambda models, shape: (1.0, 2.0))  # int8 "loses" everywhere
    monkeypatch.setattr(_quant_speed, "_CACHE", {})
    q, stats = _run(m, "quant{speed_batch=64}", calib)
    assert {b for _, b, _ in seen} == {64} and len(seen) == 6  # 3 layers, float and int8 each
    # conv2 reads a max pool: onnxruntime moves its Q above it, so both timed graphs start with it
    pooled = {name for name, _, ops in seen if ops[0] == "MaxPool"}
    unpooled = {name for name, _, ops in seen if "MaxPool" not in ops}
    assert pooled == {"features.4.weight"} and unpooled == {"features.0.weight", "classifier.weight"}
    # the pool reads a relu: the int8 form is pool -> relu -> Q, as the rewrite emits it
    assert [ops[:3] for name, _, ops in seen if name in pooled] == [["MaxPool", "Conv"],
                                                                   ["MaxPool", "Relu", "QuantizeLinear"]]
    assert stats["quantized"] == 0 and all("slower" in r for r in stats["float"].values())


class _Attention(torch.nn.Module):
    """LayerNorm read by three linears (Q, K, V), their mix read by a fourth, all on [batch, tokens, dim]."""

    def __init__(self, d=64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.out = torch.nn.Linear(d, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.q(h) + self.k(h) * self.v(h)))


@pytest.mark.parametrize("acts", ["static", "dynamic"])
def test_linears_share_one_quantizer_and_add_the_bias_in_the_int8_kernel(tmp_path, acts):
    torch.manual_seed(0)
    m = regc.capture(_Attention(), (torch.randn(2, 7, 64),))
    x = torch.randn(2, 7, 64)
    data = regc.Dataset({"x": torch.randn(16, 7, 64)}) if acts == "static" else None
    q, stats = _run(m, f"quant{{acts={acts},speed_check=false}}", data)
    assert stats["quantized"] == 4
    q.save(tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    quantizer = "QuantizeLinear" if acts == "static" else "DynamicQuantizeLinear"
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops[quantizer] == 2 and ops["MatMulIntegerToFloat"] == 4  # Q/K/V read one quantized norm
    assert ops["DequantizeLinear"] == ops["MatMul"] == 0
    mm = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    codes = {n.output[0] for n in graph.node if n.op_type == quantizer}
    assert len({n.input[0] for n in mm[:3]}) == 1 and {n.input[0] for n in mm} <= codes
    biases = {i.name for i in graph.initializer if i.name.endswith("bias")}
    assert all(len(n.input) == 7 and n.input[6] in biases for n in mm)  # bias added in the kernel
    assert ops["Add"] == 1  # only the model's own q + k * v
    sess = _ort(tmp_path / "q.onnx", tmp_path / "opt.onnx")
    opt = _ops(tmp_path / "opt.onnx")
    # the single-reader quantizer fuses into the matmul when dynamic; the shared one stays one node
    assert opt["MatMulIntegerToFloat"] + opt["DynamicQuantizeMatMul"] == 4 and opt["Add"] == 1
    with torch.no_grad():
        got = q(x)
        ref = m(x)
    y = sess.run(None, {q.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(y, got.numpy(), atol=1e-4)  # same integer math as the torch graph
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999


def test_max_accuracy_drop_widens_sensitive_linears_to_exact_uint8_codes(tmp_path):
    torch.manual_seed(0)
    m = regc.capture(_Attention(), (torch.randn(2, 7, 64),))
    data = regc.Dataset({"x": torch.randn(16, 7, 64)})
    opts = "speed_check=false,max_accuracy_drop=none"
    _, narrow = _run(m.clone(), f"quant{{{opts},reduce_range=on}}", data)  # 7-bit codes
    _, full = _run(m.clone(), f"quant{{{opts},reduce_range=off}}", data)  # 8-bit codes
    target = (narrow["calibration"]["drop"] + full["calibration"]["drop"]) / 2
    q, stats = _run(m, f"quant{{speed_check=false,reduce_range=on,max_accuracy_drop={target}}}", data)
    wide = {n for n, v in stats["layers"].items() if v.get("weight_code_range") == 127}
    assert wide and not stats["float"] and stats["calibration"]["drop"] <= target
    q.save(tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    b = [dtypes.get(n.input[1]) for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert b.count(onnx.TensorProto.UINT8) == len(wide) and b.count(onnx.TensorProto.INT8) == 4 - len(wide)
    x = torch.randn(2, 7, 64) * 3  # large codes: saturating u8s8 pair sums would show here
    with torch.no_grad():
        got = q(x)
    y = _ort(tmp_path / "q.onnx").run(None, {q.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(y, got.numpy(), atol=1e-4)


def _matmul_integer(codes: np.ndarray, a: np.ndarray) -> np.ndarray:
    """onnxruntime's uint8 x int8 GEMM (the kernel MatMulIntegerToFloat runs) on a [M, K] @ codes [K, N]."""
    from onnx import TensorProto as T
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    g = oh.make_graph([oh.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
                      [oh.make_tensor_value_info("a", T.UINT8, list(a.shape))],
                      [oh.make_tensor_value_info("y", T.INT32, [a.shape[0], codes.shape[1]])],
                      [nh.from_array(codes, "w")])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a})[0]


def test_pair_limited_8bit_codes_are_exact_in_the_u8s8_kernel_and_beat_7bit():
    """Pairs (2i, 2i+1) along K of same sign sum to at most 128 in magnitude, so onnxruntime's u8s8 GEMM
    is exact even for all-255 inputs (full-range 8-bit codes are not, on CPUs without VNNI); the weight
    error is well below 7-bit codes'."""
    from regc.passes._qdq import dequantize, limit_pairs, quantize_weight, quantize_weight_pairs
    from regc.passes._quant_speed import cpu_has_vnni

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * (torch.rand(48, 1, generator=g) + 0.2)  # [N, K]
    codes, scale = quantize_weight_pairs(w, 0, True)
    pairs = codes.to(torch.int32).reshape(48, 32, 2)
    assert pairs.clamp(min=0).sum(-1).max() <= 128 and pairs.clamp(max=0).sum(-1).min() >= -128
    assert codes.abs().max() > 63  # more than 7 bits used
    err = (w - dequantize(codes, scale, 0)).pow(2).sum()
    c7, s7 = quantize_weight(w, 7, 0)
    assert err < 0.6 * (w - dequantize(c7, s7, 0)).pow(2).sum()
    c = torch.randint(-127, 128, (8, 33), generator=g, dtype=torch.int8)
    lim = limit_pairs(c)
    pad = torch.nn.functional.pad(c.to(torch.int32), (0, 1)).reshape(8, 17, 2)
    ok = (pad.clamp(min=0).sum(-1) <= 128) & (pad.clamp(max=0).sum(-1) >= -128)
    assert torch.equal(torch.nn.functional.pad(lim.to(torch.int32), (0, 1)).reshape(8, 17, 2)[ok], pad[ok])

    a = np.concatenate([np.full((4, 64), 255, np.uint8), np.random.default_rng(0).integers(0, 256, (4, 64))
                        .astype(np.uint8)])
    limited = codes.t().contiguous().numpy()
    np.testing.assert_array_equal(_matmul_integer(limited, a), a.astype(np.int64) @ limited.astype(np.int64))
    if not cpu_has_vnni():
        full = quantize_weight(w, 8, 0)[0].t().contiguous().numpy()
        assert not np.array_equal(_matmul_integer(full, a), a.astype(np.int64) @ full.astype(np.int64))


def test_reduce_range_pairs_is_more_accurate_than_7bit_and_exact_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    m = regc.capture(_Attention(), (torch.randn(2, 7, 64),))
    data = regc.Dataset({"x": torch.randn(16, 7, 64)})
    _, seven = _run(m.clone(), "quant{speed_check=false,reduce_range=on}", data)
    q, stats = _run(m, "quant{speed_check=false,reduce_range=pairs}", data)
    assert stats["reduce_range"] == "pairs" and stats["quantized"] == 4
    assert all(v.get("weight_codes", "").startswith("8-bit, pair-limited") for v in stats["layers"].values())
    assert stats["calibration"]["drop"] < seven["calibration"]["drop"]
    for name, v in stats["layers"].items():  # one layer quantized at a time (activation error included)
        assert v["sensitivity_sqnr_db"] > seven["layers"][name]["sensitivity_sqnr_db"] + 0.5, name
    q.save(tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    b = [inits[n.input[1]] for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(b) == 4 and all(w.dtype == np.int8 and np.abs(w).max() > 63 for w in b)
    x = torch.randn(2, 7, 64) * 3  # large codes: saturating u8s8 pair sums would show here
    with torch.no_grad():
        got = q(x)
    y = _ort(tmp_path / "q.onnx").run(None, {q.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(y, got.numpy(), atol=1e-4)


def test_pool_of_a_float_relu_stays_float_in_front_of_an_int8_conv(tmp_path, monkeypatch):
    m, d, calib = _digits()
    def conv1_float(layer, batch=None):
        return (0.0, 1.0) if layer.name == "features.0.weight" else (1.0, 0.0)

    monkeypatch.setattr(quant_mod, "time_layer", conv1_float)
    q, stats = _run(m, "quant", calib)
    assert [v["format"] for v in stats["layers"].values()] == ["float", "int8", "int8"]
    q.save(tmp_path / "q.onnx")
    sess = _ort(tmp_path / "q.onnx", tmp_path / "opt.onnx")
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    assert collections.Counter(n.op_type for n in nodes)["QLinearConv"] == 1
    # relu(pool(conv1)): the Q stays below the float NCHWc pool (no uint8 NCHW MaxPool)
    pools = [n.domain for n in nodes if n.op_type == "MaxPool"]
    assert pools == ["com.microsoft.nchwc"]
    logits = sess.run(None, {"image": d.x_test.numpy()})[0]
    np.testing.assert_allclose(logits, q(d.x_test).detach().numpy(), atol=0.15)


def test_unsupported_layers_are_listed_not_fatal():
    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)
            self.fc = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.up(x).flatten(1)[:, :16])

    m = regc.capture(Up(), (torch.randn(2, 4, 3, 3),))
    q, stats = _run(m, "quant{acts=dynamic,speed_check=false}")
    assert list(stats["unsupported"]) == ["up.weight"] and stats["quantized"] == 1


def test_static_needs_data_and_bad_options_raise():
    with pytest.raises(ConfigError, match="calibration data"):
        _run(capture_zoo("mlp"), "quant")
    bad = [("quant{bits=9}", "bits"), ("quant{acts=int4}", "acts"), ("quant{smooth=2}", "smooth"),
           ("quant{max_accuracy_drop=-1}", "max_accuracy_drop"), ("quant{percentile=10}", "percentile"),
           ("quant{embedding_bits=6}", "embedding_bits"), ("quant{group_size=24}", "group_size"),
           ("quant{speed_batch=-1}", "speed_batch")]
    for text, field in bad:
        with pytest.raises(ConfigError, match=f"quant.{field}"):
            parse_pipeline(text)


@pytest.mark.slow
def test_minilm_static_int8_fidelity_and_bytes():
    from regc.zoo import SENTENCES, minilm, minilm_tokenize

    m = capture_zoo(minilm())
    ids, mask = minilm_tokenize(SENTENCES)
    with torch.no_grad():
        ref = m(ids, mask)
    calib = regc.Dataset({"input_ids": ids[:16], "attention_mask": mask[:16]})
    q, stats = _run(m, "quant{speed_check=false,sweep_samples=1,embedding_bits=4,max_accuracy_drop=0.004}",
                    calib)
    assert stats["layers"]["bert.embeddings.word_embeddings.weight"]["format"] == "int4_packed"
    assert stats["layers"]["bert.embeddings.position_embeddings.weight"]["format"] == "int8"
    # the most sensitive linears get full 8-bit (uint8) weights, or stay float, until the drop fits
    assert 35 <= stats["quantized"] <= 39 and stats["calibration"]["drop"] <= 0.004
    assert stats["weight_bytes"]["after"] < 0.25 * stats["weight_bytes"]["before"]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(ids, mask), ref)
    assert cos[16:].mean() >= 0.995 and cos.min() >= 0.99


def test_tied_embedding_and_head_are_not_smoothed():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.norm(self.emb(ids)))

    torch.manual_seed(0)
    m = regc.capture(Tied(), (torch.randint(0, 50, (2, 6)),))
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        ref = m(ids)
    q, stats = _run(m, "quant{speed_check=false,acts=dynamic}")
    assert stats["smoothquant"]["layernorms"] == 0 and stats["quantized"] == 2
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(ids).flatten(), ref.flatten(), dim=0) > 0.999
