"""Does int8 pay off for this layer on this CPU? Time it in onnxruntime, alone, both ways.

Each conv/linear layer is built as a one-op ONNX graph with its real shapes, once in float and once
in the form the rewrite emits (a conv: QDQ, with the Q/DQ of its output, which QLinearConv needs; a
rank-2 linear with a static input range: the Gemm with an int32 bias that becomes QGemm; other
linears: Q and MatMulIntegerToFloat with the bias), at the
captured shapes or with the batch dim set to ``batch`` when it is dynamic, and timed on one thread
(best of 9 interleaved repeats). Equal shapes share one measurement. A layer fed by a max pool is
timed with that pool in front: onnxruntime moves a Q right after a pool above it, so the int8 form
pools in uint8 (on x86 its NCHW uint8 pool is many times slower than the float NCHWc one, which can
cost more than the int8 conv saves), except when the pool reads a relu, which the rewrite moves
after the pool (`_quant_layers.relu_under_pool`): the float pool then stays. Small layers often lose:
quantizing the input and dequantizing the output costs more than the int8 arithmetic saves.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from regc.passes._quant_layers import QLayer, relu_under_pool

aten = torch.ops.aten

__all__ = ["time_layer", "cpu_has_vnni"]

_CACHE: dict[tuple, tuple[float, float]] = {}


def time_layer(layer: QLayer, batch: int | None = None) -> tuple[float, float] | None:
    """(float ms, int8 ms) for ``layer`` in onnxruntime (leading dim set to ``batch`` if given), or None
    when its shapes are unknown."""
    x_val = layer.x.meta.get("val") if layer.x is not None else None
    if x_val is None or layer.kind == "embedding":
        return None
    pool = _pool(layer.x)
    if pool is not None:
        x_val = layer.x.args[0].meta.get("val")
    x_shape = list(x_val.shape)
    if batch is not None:
        x_shape[0] = batch
    if not all(isinstance(d, int) for d in x_shape):
        return None
    attrs = _conv_attrs(layer) if layer.kind == "conv" else {}
    if attrs is None:
        return None
    relu = relu_under_pool(layer.x) is not None
    key = (layer.kind, tuple(x_shape), tuple(layer.codes.shape), layer.act == "dynamic",
           tuple(sorted(attrs.items())), tuple(sorted((pool or {}).items())), relu)
    if key not in _CACHE:
        _CACHE[key] = _time([_graph(layer, x_shape, attrs, q, pool, relu) for q in (False, True)], x_shape)
    return _CACHE[key]


def _pool(x) -> dict | None:
    """ONNX MaxPool attributes when ``x`` is a 2-d max pool whose input shape is known, else None."""
    if x.op != "call_function" or x.target is not aten.max_pool2d.default or \
            x.args[0].meta.get("val") is None:
        return None
    a = list(x.args) + [None] * 6
    kernel = _ints(a[1], 1, 2)
    stride = _ints(a[2], 1, 2) if a[2] else kernel
    pads = _ints(a[3], 0, 2)
    return {"kernel_shape": kernel, "strides": stride, "pads": pads + pads, "dilations": _ints(a[4], 1, 2),
            "ceil_mode": int(bool(a[5]))}


def _ints(v, default: int, k: int) -> tuple[int, ...]:
    """A conv/pool size argument as ``k`` ints (an int or a one-item list repeated; None, [] -> default)."""
    v = list(v) if isinstance(v, (list, tuple)) else [] if v is None else [v]
    v = v or [default]
    return tuple(int(i) for i in (v * k if len(v) == 1 else v))


def cpu_has_vnni() -> bool:
    """True on CPUs whose int8 dot products do not saturate (AVX-VNNI, AVX512-VNNI, AMX) or are not x86."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(k in flags for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _conv_attrs(layer: QLayer) -> dict | None:
    a = list(layer.node.args) + [None] * 7
    k = layer.codes.dim() - 2
    if isinstance(a[4], str):
        return None
    pads = _ints(a[4], 0, k)
    return {"strides": _ints(a[3], 1, k), "pads": pads + pads, "dilations": _ints(a[5], 1, k),
            "group": int(a[6] or 1)}


def _graph(layer: QLayer, x_shape: list[int], attrs: dict, quantized: bool, pool: dict | None = None,
           relu: bool = False) -> onnx.ModelProto:
    """The layer alone, float or in its rewritten int8 form; ``relu``: the int8 form reads
    relu(pool(x)), as the rewrite orders a relu-fed pool in front of a Q (onnxruntime folds that relu)."""
    codes = layer.codes.numpy()
    nodes, inits = [], []
    if pool is not None:
        lifted = quantized and relu
        nodes.append(helper.make_node("MaxPool", ["x0"], ["xp" if lifted else "x"],
                                      **{k: list(v) if isinstance(v, tuple) else v for k, v in pool.items()}))
        if lifted:
            nodes.append(helper.make_node("Relu", ["xp"], ["x"]))
    w_shape = codes.T.shape if layer.kind == "linear" and layer.w_axis == 0 else codes.shape
    out_ch = w_shape[1] if layer.kind == "linear" else w_shape[0]
    inits.append(numpy_helper.from_array(np.full(w_shape, 0.01, np.float32) if not quantized
                                         else np.ones(w_shape, np.int8), "w"))
    rank3 = len(x_shape) >= 3
    if quantized:
        inits += [numpy_helper.from_array(np.full(out_ch, 0.01, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(out_ch, np.int8), "wz"),
                  numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(128, np.uint8), "z")]
        if layer.act == "dynamic":
            nodes.append(helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]))
        else:
            nodes.append(helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]))
    if layer.kind == "linear" and quantized and (rank3 or layer.act == "dynamic"):  # _rewrite_int8_linear
        inits.append(numpy_helper.from_array(np.zeros(out_ch, np.float32), "b"))
        scale, zp = ("xs", "xz") if layer.act == "dynamic" else ("s", "z")
        nodes.append(helper.make_node("MatMulIntegerToFloat", ["xq", "w", scale, "ws", zp, "", "b"], ["y"],
                                      domain="com.microsoft"))
        return _model(nodes, inits, x_shape, pool is not None)
    x = "x"
    if quantized:
        nodes.append(helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"],
                                      axis=1 if layer.kind == "linear" else 0))
        xq, xs, xz = ("xq", "xs", "xz") if layer.act == "dynamic" else ("xq", "s", "z")
        nodes.append(helper.make_node("DequantizeLinear", [xq, xs, xz], ["xd"]))
        x, w = "xd", "wd"
    else:
        w = "w"
    if layer.kind == "linear" and quantized:
        inits += [numpy_helper.from_array(np.zeros(out_ch, np.int32), "bq"),
                  numpy_helper.from_array(np.full(out_ch, 2e-4, np.float32), "bs"),
                  numpy_helper.from_array(np.zeros(out_ch, np.int32), "bz")]
        nodes += [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], axis=0),
                  helper.make_node("Gemm", [x, w, "b"], ["y"])]
    elif layer.kind == "linear":
        inits.append(numpy_helper.from_array(np.zeros((1, out_ch) if rank3 else (out_ch,), np.float32), "b"))
        nodes += [helper.make_node("MatMul", [x, w], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    else:
        inits.append(numpy_helper.from_array(np.zeros(out_ch, np.float32), "b"))
        nodes.append(helper.make_node("Conv", [x, w, "b"], ["y" if not quantized else "c"], **{
            k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}))
        if quantized:
            nodes += [helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
                      helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"])]
    return _model(nodes, inits, x_shape, pool is not None)


def _model(nodes: list, inits: list, x_shape: list[int], pooled: bool) -> onnx.ModelProto:
    x_info = helper.make_tensor_value_info("x0" if pooled else "x", TensorProto.FLOAT, x_shape)
    graph = helper.make_graph(nodes, "layer", [x_info],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _time(models: list[onnx.ModelProto], x_shape: list[int]) -> tuple[float, ...]:
    """Best-of-9 ms per run of each model, measured interleaved so load changes hit all alike."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                for m in models]
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    feed = {models[0].graph.input[0].name: x}
    t0 = time.perf_counter()
    for s in sessions:
        s.run(None, feed)
    reps = max(1, min(100, int(0.005 / max((time.perf_counter() - t0) / len(sessions), 1e-6))))
    best = [float("inf")] * len(sessions)
    for _ in range(9):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, feed)
            best[i] = min(best[i], (time.perf_counter() - t0) / reps)
    return tuple(b * 1e3 for b in best)
