"""Integer quantization math and the graph nodes that carry it (shared by `quant` and its helpers).

Weights: symmetric int-b, ``s = max|w| / (2^(b-1) - 1)`` per output channel (or per tensor),
``q = clamp(round(w / s), -qmax, qmax)``, ``w_hat = s q``. Activations: affine uint8 over a range
[lo, hi] that contains 0, ``s = (hi - lo) / 255``, ``z = round(-lo / s)``,
``x_hat = (clamp(round(x / s) + z, 0, 255) - z) s``; the dynamic form takes lo/hi from each tensor at
run time (ONNX DynamicQuantizeLinear). In the graph a weight becomes an int8 buffer read through
``quantized_decomposed.dequantize_per_channel`` and an activation a ``quantize_per_tensor`` /
``dequantize_per_tensor`` pair; the exporter writes them as DequantizeLinear / QuantizeLinear.

Pair-limited 8-bit codes (x86 without VNNI): onnxruntime's uint8 x int8 GEMM there (vpmaddubsw) adds the
products of inputs 2i and 2i+1 in int16 with saturation. With uint8 inputs up to 255 a pair of weight codes
(q_2i, q_2i+1) is exact when its positive codes sum to at most 128 and its negative codes to at least -128
(255 * 128 = 32640 <= 32767). 7-bit codes (|q| <= 63) always are, at half the resolution. Instead:
``limit_pairs`` pulls each over-limit same-sign pair onto the limit (each magnitude loses half the excess,
the larger one the odd unit: the nearest point in L2), and ``quantize_weight_pairs`` chooses per output
channel the scale s = max|w| / c, c in {63, 65, .., 127}, whose pair-limited codes have the smallest
||w - s q||^2 (c = 63 is the 7-bit code, so never worse than it; MiniLM's linears: +3.6 to +4 dB SQNR over
7-bit, 6.1 dB being full 8-bit).

4-bit, in groups of G consecutive elements of a row (G a power of two >= 16), codes two per byte
(element 2i in the low nibble):
    linear weights, symmetric:        w_hat = s_g (u - 8),   u = q + 8 in [1, 15]
        -> com.microsoft MatMulNBits (bits=4, block_size=G, accuracy_level 0: float math on the
           decoded weights), which onnxruntime runs from the packed storage;
    embedding tables, asymmetric:     w_hat = s_g u + m_g,   s_g = (max_g - min_g) / 15, m_g = min_g,
        s_g and m_g stored in float16; only the gathered rows are decoded (standard ONNX ops).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx
from onnx import TensorProto, helper
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from regc.ir import Model
from regc.plugins import register_onnx_translation

qd = torch.ops.quantized_decomposed

__all__ = ["quantize_weight", "limit_pairs", "quantize_weight_pairs", "act_qparams", "fake_quant_static",
           "dynamic_fake_quant", "dynamic_quantize", "linear_int8", "weight_node",
           "static_qdq_node", "dynamic_qdq_node", "free_name", "store_buffers", "pack_int4", "unpack_int4",
           "quantize_groups", "quantize_groups_asym", "pack_rows", "unpack_rows", "matmul_nbits",
           "gather_int4"]


def quantize_weight(w: torch.Tensor, bits: int, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes (int8 tensor) and float32 scales (per ``axis``, or a 0-d tensor per tensor)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    if axis is None:
        amax = w.abs().amax()
    else:
        amax = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis])
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    codes = torch.clamp(torch.round(w / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return codes, scale


PAIR_LIMIT = 128


def limit_pairs(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` [N, K] with every same-sign pair (2i, 2i+1) along K pulled to |sum| <= PAIR_LIMIT."""
    n, k = codes.shape
    p = torch.nn.functional.pad(codes.to(torch.int16), (0, k % 2)).reshape(n, -1, 2)
    for sign in (1, -1):
        m = (sign * p).clamp(min=0)
        excess = (m.sum(-1) - PAIR_LIMIT).clamp(min=0)
        first_big = m[..., 0] >= m[..., 1]
        big, small = (excess + 1) // 2, excess // 2
        cut = torch.stack([torch.where(first_big, big, small), torch.where(first_big, small, big)], -1)
        p = p - sign * cut
    return p.reshape(n, -1)[:, :k].to(torch.int8)


def quantize_weight_pairs(w: torch.Tensor, out_axis: int, per_channel: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-limited 8-bit codes and scales (per output channel, or a 0-d tensor per tensor) of a 2-D linear
    weight whose output channels lie on ``out_axis`` (0: [N, K], 1: [K, N]); pairs along the input dim K."""
    wk = w.detach().float()
    wk = wk if out_axis == 0 else wk.t()
    amax = wk.abs().amax(1) if per_channel else wk.abs().amax().expand(wk.shape[0])
    best_err = torch.full_like(amax, torch.inf)
    best_q, best_s = torch.zeros(wk.shape, dtype=torch.int8), torch.ones_like(amax)
    for c in range(63, 128, 2):
        scale = torch.where(amax > 0, amax / c, torch.ones_like(amax))
        q = limit_pairs(torch.clamp(torch.round(wk / scale[:, None]), -127, 127))
        err = (wk - q.float() * scale[:, None]).pow(2).sum(1)
        better = err < best_err if per_channel else (err.sum() < best_err[0]).expand_as(amax)
        best_err = torch.where(better, err if per_channel else err.sum(), best_err)
        best_q, best_s = torch.where(better[:, None], q, best_q), torch.where(better, scale, best_s)
    return (best_q if out_axis == 0 else best_q.t().contiguous()), (best_s if per_channel else best_s[0])


def dequantize(codes: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    shape = [1] * codes.dim()
    if axis is not None:
        shape[axis] = -1
    return codes.float() * scale.reshape(shape)


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 affine (scale, zero point) for the range [lo, hi] widened to contain 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(min(max(round(-lo / scale), 0), 255))
    return float(scale), zp


def fake_quant_static(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    q = qd.quantize_per_tensor.default(x, scale, zp, 0, 255, torch.uint8)
    return qd.dequantize_per_tensor.default(q, scale, zp, 0, 255, torch.uint8)


def _dynamic_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes (as float), scale and zero point of ``x`` over its own range (DynamicQuantizeLinear)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zp, 0, 255), scale, zp


@torch.library.custom_op("regc::dynamic_fake_quant", mutates_args=())
def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """uint8 quantize-dequantize with the range of ``x`` itself (ONNX DynamicQuantizeLinear + DQ)."""
    q, scale, zp = _dynamic_codes(x)
    return (q - zp) * scale


@dynamic_fake_quant.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _dynamic_fake_quant_onnx(x):
    q, scale, zp = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(q, scale, zp)


register_onnx_translation(torch.ops.regc.dynamic_fake_quant.default, _dynamic_fake_quant_onnx)


@torch.library.custom_op("regc::dynamic_quantize", mutates_args=())
def dynamic_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes, float scale and uint8 zero point of ``x`` over its own range (DynamicQuantizeLinear)."""
    q, scale, zp = _dynamic_codes(x)
    return q.to(torch.uint8), scale.float(), zp.to(torch.uint8)


@dynamic_quantize.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, dtype=torch.uint8), x.new_empty([]), x.new_empty([], dtype=torch.uint8))


def _dynamic_quantize_onnx(x):
    return op.DynamicQuantizeLinear(x)


register_onnx_translation(torch.ops.regc.dynamic_quantize.default, _dynamic_quantize_onnx)


@torch.library.custom_op("regc::linear_int8", mutates_args=())
def linear_int8(xq: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, w: torch.Tensor,
                w_scale: torch.Tensor, w_zp: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = s_x (x_q - z_x) @ ((W_q - z_w) diag(s_w)) + b``: uint8 activation codes x_q [..., K], weight
    codes W_q [K, N] (int8 with z_w = 0, or uint8 with z_w = 128) with one scale per column (or one in
    all), float bias [N] (or none)."""
    y = ((xq.float() - x_zp.float()) * x_scale).matmul((w.float() - w_zp) * w_scale)
    return y if bias is None else y + bias


@linear_int8.register_fake
def _(xq, x_scale, x_zp, w, w_scale, w_zp, bias):
    return xq.new_empty([*xq.shape[:-1], w.shape[1]], dtype=torch.float32)


_MATMUL_INT_TO_FLOAT = onnxscript.values.Op(
    onnxscript.values.Opset("com.microsoft", 1), "MatMulIntegerToFloat", OpSchema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("A", "tensor(uint8)"), OpSchema.FormalParameter("B", "T"),
                OpSchema.FormalParameter("a_scale", "tensor(float)"),
                OpSchema.FormalParameter("b_scale", "tensor(float)"),
                OpSchema.FormalParameter("a_zero_point", "tensor(uint8)"),
                OpSchema.FormalParameter("b_zero_point", "T",
                                         param_option=OpSchema.FormalParameterOption.Optional),
                OpSchema.FormalParameter("bias", "tensor(float)",
                                         param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[OpSchema.FormalParameter("Y", "tensor(float)")],
        type_constraints=[("T", ["tensor(int8)", "tensor(uint8)"], "")]))


def _linear_int8_onnx(xq, x_scale, x_zp, w, w_scale, w_zp, bias=None):
    zp = op.Constant(value=helper.make_tensor("w_zp", TensorProto.UINT8, [], [w_zp])) if w_zp else None
    return _MATMUL_INT_TO_FLOAT(xq, w, x_scale, w_scale, x_zp, zp, bias)


register_onnx_translation(torch.ops.regc.linear_int8.default, _linear_int8_onnx)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two's-complement 4-bit codes in [-8, 7], two per byte (element 2i in the low nibble), flattened."""
    flat = codes.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | flat[1::2] << 4).to(torch.uint8)


def _nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    p = packed.to(torch.int16)
    both = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:numel]
    return both - ((both & 8) << 1)  # sign-extend: n >= 8 -> n - 16


@torch.library.custom_op("regc::unpack_int4", mutates_args=())
def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """float32 weights ``scale * code`` (``scale`` broadcastable to ``shape``) from packed 4-bit codes."""
    numel = 1
    for d in shape:
        numel *= d
    return _nibbles(packed, numel).reshape(shape).float() * scale


@unpack_int4.register_fake
def _(packed: torch.Tensor, scale: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return packed.new_empty(shape, dtype=torch.float32)


def _int4_function() -> onnx.FunctionProto:
    """Int4Decode(packed: uint8, scale: float, shape: int64) -> float, in standard ONNX ops."""
    def const(name, value, dtype, dims=()):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, value))

    nodes = [
        const("four", [4], TensorProto.UINT8), const("fifteen", [15], TensorProto.UINT8),
        const("eight", [8], TensorProto.INT64), const("two", [2], TensorProto.INT64),
        const("one", [1], TensorProto.INT64, [1]), const("zero", [0], TensorProto.INT64, [1]),
        const("flat", [-1], TensorProto.INT64, [1]),
        helper.make_node("BitwiseAnd", ["packed", "fifteen"], ["lo8"]),
        helper.make_node("BitShift", ["packed", "four"], ["hi8"], direction="RIGHT"),
        helper.make_node("Unsqueeze", ["lo8", "one"], ["lo2"]),
        helper.make_node("Unsqueeze", ["hi8", "one"], ["hi2"]),
        helper.make_node("Concat", ["lo2", "hi2"], ["pairs"], axis=1),
        helper.make_node("Reshape", ["pairs", "flat"], ["both8"]),
        helper.make_node("ReduceProd", ["shape"], ["numel"], keepdims=1),
        helper.make_node("Slice", ["both8", "zero", "numel"], ["codes8"]),
        helper.make_node("Cast", ["codes8"], ["codes"], to=TensorProto.INT64),
        helper.make_node("BitwiseAnd", ["codes", "eight"], ["sign"]),
        helper.make_node("Mul", ["sign", "two"], ["wrap"]),
        helper.make_node("Sub", ["codes", "wrap"], ["signed"]),
        helper.make_node("Reshape", ["signed", "shape"], ["shaped"]),
        helper.make_node("Cast", ["shaped"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["w", "scale"], ["y"]),
    ]
    return helper.make_function("regc", "Int4Decode", ["packed", "scale", "shape"], ["y"], nodes,
                                [helper.make_opsetid("", 18)])


_INT4_OP = onnxscript.values.Op(onnxscript.values.Opset("regc", 1), "Int4Decode", OpSchema(
    "Int4Decode", "regc", 1, inputs=[OpSchema.FormalParameter("packed", "tensor(uint8)"),
                                     OpSchema.FormalParameter("scale", "tensor(float)"),
                                     OpSchema.FormalParameter("shape", "tensor(int64)")],
    outputs=[OpSchema.FormalParameter("y", "tensor(float)")]))


def _unpack_int4_onnx(packed, scale, shape):
    return _INT4_OP(packed, scale, op.Constant(value_ints=list(shape)))


register_onnx_translation(torch.ops.regc.unpack_int4.default, _unpack_int4_onnx, (_int4_function(),))


def quantize_groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes (int8, shape of ``w`` [N, K]) and float32 scales [N, K / group] per group of a row."""
    qmax = 2 ** (bits - 1) - 1
    g = w.detach().float().reshape(w.shape[0], -1, group)
    amax = g.abs().amax(-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.clamp(torch.round(g / scale[..., None]), -qmax, qmax).to(torch.int8)
    return codes.reshape(w.shape), scale


def quantize_groups_asym(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes (uint8 in [0, 15], shape of ``w``), float16 scales and minima per group."""
    g = w.detach().float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).half()
    zero = lo.half()
    codes = torch.clamp(torch.round((g - zero.float()[..., None]) / scale.float()[..., None]), 0, 15)
    return codes.to(torch.uint8).reshape(w.shape), scale, zero


def pack_rows(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [..., 2m] -> bytes [..., m] (element 2i in the low nibble)."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_rows(p: torch.Tensor) -> torch.Tensor:
    """Bytes [..., m] -> unsigned 4-bit codes [..., 2m] (uint8)."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)


@torch.library.custom_op("regc::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int, n: int, group: int
                 ) -> torch.Tensor:
    """``x @ W^T`` with W [n, k] = s_g (u - 8), packed [n, k / group, group / 2], scale [n * k / group]."""
    u = unpack_rows(packed).float() - 8
    w = (u * scale.reshape(n, k // group, 1)).reshape(n, k)
    return x.matmul(w.t())


@matmul_nbits.register_fake
def _(x, packed, scale, k, n, group):
    return x.new_empty([*x.shape[:-1], n])


_MATMUL_NBITS = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", OpSchema(
    "MatMulNBits", "com.microsoft", 1,
    inputs=[OpSchema.FormalParameter("A", "tensor(float)"), OpSchema.FormalParameter("B", "tensor(uint8)"),
            OpSchema.FormalParameter("scales", "tensor(float)")],
    outputs=[OpSchema.FormalParameter("Y", "tensor(float)")],
    attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("K", "N", "bits", "block_size",
                                                                            "accuracy_level")]))


def _matmul_nbits_onnx(x, packed, scale, k, n, group):
    return _MATMUL_NBITS(x, packed, scale, K=k, N=n, bits=4, block_size=group, accuracy_level=0)


register_onnx_translation(torch.ops.regc.matmul_nbits.default, _matmul_nbits_onnx)


@torch.library.custom_op("regc::gather_int4", mutates_args=())
def gather_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor,
                group: int) -> torch.Tensor:
    """Rows ``ids`` of the table s_g u + m_g: packed [V, D / 2], scale and zero [V, D / group] (float16)."""
    u = unpack_rows(packed[ids]).float()
    u = u.reshape(*ids.shape, -1, group)
    return (u * scale[ids].float()[..., None] + zero[ids].float()[..., None]).reshape(*ids.shape, -1)


@gather_int4.register_fake
def _(packed, scale, zero, ids, group):
    return packed.new_empty([*ids.shape, packed.shape[1] * 2], dtype=torch.float32)


def _gather_int4_onnx(packed, scale, zero, ids, group):
    rows = op.Gather(packed, ids, axis=0)
    lo = op.BitwiseAnd(rows, op.Constant(value=helper.make_tensor("f", TensorProto.UINT8, [], [15])))
    hi = op.BitShift(rows, op.Constant(value=helper.make_tensor("s", TensorProto.UINT8, [], [4])),
                     direction="RIGHT")
    last = op.Constant(value_ints=[-1])
    codes = op.Cast(op.Concat(op.Unsqueeze(lo, last), op.Unsqueeze(hi, last), axis=-1), to=TensorProto.FLOAT)
    ids_shape = op.Shape(ids)
    u = op.Reshape(codes, op.Concat(ids_shape, op.Constant(value_ints=[-1, group]), axis=0))
    s = op.Unsqueeze(op.Cast(op.Gather(scale, ids, axis=0), to=TensorProto.FLOAT), last)
    m = op.Unsqueeze(op.Cast(op.Gather(zero, ids, axis=0), to=TensorProto.FLOAT), last)
    return op.Reshape(op.Add(op.Mul(u, s), m), op.Concat(ids_shape, last, axis=0))


register_onnx_translation(torch.ops.regc.gather_int4.default, _gather_int4_onnx)


def free_name(model: Model, base: str) -> str:
    taken = set(model.gm.state_dict()) | {n for n, _ in model.gm.named_modules()}
    cand, i = base.replace(".", "_"), 0
    while cand in taken or hasattr(model.gm, cand):
        i += 1
        cand = f"{base.replace('.', '_')}_{i}"
    return cand


def store_buffers(model: Model, before: fx.Node, user: str, tensors: dict[str, torch.Tensor]
                  ) -> dict[str, fx.Node]:
    """Store ``{kind: tensor}`` as buffers named ``{user}_{kind}`` (recorded as ``user:kind``) and return
    ``{kind: get_attr node}``, inserted before ``before``."""
    nodes = {}
    for kind, t in tensors.items():
        name = free_name(model, f"{user}_{kind}")
        model.set_tensor(name, t, trainable=False)
        model.param_names[name] = f"{user}:{kind}"
        with model.gm.graph.inserting_before(before):
            nodes[kind] = model.gm.graph.get_attr(name)
    return nodes


def weight_node(model: Model, before: fx.Node, user: str, codes: torch.Tensor, scale: torch.Tensor,
                axis: int | None, packed: bool = False, dtype: torch.dtype = torch.int8) -> fx.Node:
    """Store ``codes`` (int8, or int32 for a bias) and ``scale`` as buffers and return a dequantize node
    reading them (``packed``: 4-bit codes two per byte, unpacked by ``regc::unpack_int4``)."""
    g = model.gm.graph
    if packed:
        bshape = [1] * codes.dim()
        if axis is not None:
            bshape[axis] = -1
        t = store_buffers(model, before, user, {"q4": pack_int4(codes), "scale": scale.reshape(bshape)})
        with g.inserting_before(before):
            return g.call_function(torch.ops.regc.unpack_int4.default,
                                   (t["q4"], t["scale"], list(codes.shape)))
    t = store_buffers(model, before, user,
                      {"q": codes, "scale": scale, "zp": torch.zeros_like(scale, dtype=torch.int64)})
    q, s, z = t["q"], t["scale"], t["zp"]
    with g.inserting_before(before):
        qmin, qmax = torch.iinfo(dtype).min, torch.iinfo(dtype).max
        if axis is None:
            return g.call_function(qd.dequantize_per_tensor.tensor, (q, s, z, qmin, qmax, dtype))
        return g.call_function(qd.dequantize_per_channel.default, (q, s, z, axis, qmin, qmax, dtype))


def static_qdq_node(model: Model, before: fx.Node, x: fx.Node, scale: float, zp: int) -> fx.Node:
    g = model.gm.graph
    with g.inserting_before(before):
        q = g.call_function(qd.quantize_per_tensor.default, (x, scale, zp, 0, 255, torch.uint8))
        return g.call_function(qd.dequantize_per_tensor.default, (q, scale, zp, 0, 255, torch.uint8))


def dynamic_qdq_node(model: Model, before: fx.Node, x: fx.Node) -> fx.Node:
    with model.gm.graph.inserting_before(before):
        return model.gm.graph.call_function(torch.ops.regc.dynamic_fake_quant.default, (x,))
