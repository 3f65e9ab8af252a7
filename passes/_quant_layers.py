"""The layers `quant` can quantize, their simulation, and their rewrite into QDQ form.

A ``QLayer`` is one weighted node (linear-like, conv-like, embedding) with its int8 weight codes and
the quantizer of its activation input. ``simulate`` runs the float graph with any subset of layers
quantized (weights replaced by their dequantized codes, inputs fake-quantized with the same ops the
rewritten graph uses), which is how sensitivity and fallback are measured without rewriting.
``rewrite`` turns a layer into onnxruntime's int8 kernels:
    linear:    MatMulIntegerToFloat(Q(x), W_int8^T, s_x, s_w, z_x, b)  (bias added in the kernel; one Q
               per activation for all its readers, e.g. Q/K/V; DynamicQuantizeLinear when dynamic)
               wide (8-bit codes on CPUs without VNNI): W stored uint8, z_w = 128 -> the exact u8u8 kernel
    rank 2:    Gemm(DQ(Q(x)), DQ(W_int8^T), DQ(b_int32))           -> QGemm   (static activations)
    conv:      Q(relu(Conv(DQ(Q(x)), DQ(W_int8, per out channel), b))) -> QLinearConv (+ fused relu)
    embedding: Gather(W_int8, ids) * Gather(scale, ids)            (weight-only; the table stays int8)
    4-bit (weight-only, groups of G along a row, see _qdq):
    linear:    MatMulNBits(x, W_packed, scales)                    (runs from the packed storage)
    embedding: decode(Gather(W_packed, ids)) * Gather(s, ids) + Gather(m, ids)
A conv with a static input range also quantizes its output (after its relu, if that is its only user),
and a later layer whose input comes from it through range-preserving ops (max pool, relu, reshapes)
reuses that (scale, zero point), so onnxruntime keeps the whole chain in uint8 (its pools included)
instead of dequantizing between layers. For a 4-bit or weight-only linear with a rank >= 3 input the
bias is stored as (1, N), which keeps onnxruntime's MatMul+Add->Gemm fusion from firing. A rank-2
linear with a static input range is a Gemm instead, its bias stored as int32 codes
b_q = round(b / (s_x s_w)) (error at most s_x s_w / 2 per output, simulated too), which is the form
onnxruntime fuses into QGemm.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from regc.ir import Model
from regc.opclass import conv_view, is_param_node, linear_view
from regc.passes._qdq import (
    dequantize,
    dynamic_fake_quant,
    dynamic_qdq_node,
    fake_quant_static,
    pack_rows,
    quantize_groups,
    quantize_groups_asym,
    quantize_weight,
    quantize_weight_pairs,
    static_qdq_node,
    store_buffers,
    weight_node,
)

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

__all__ = ["QLayer", "find_layers", "simulate", "rewrite", "conv_output", "chain_source", "relu_under_pool",
           "integer_linear"]

_RANGE_KEEPING = {aten.max_pool2d.default, aten.max_pool1d.default, aten.relu.default, aten.view.default,
                  aten.reshape.default, aten.flatten.using_ints, aten._unsafe_view.default,
                  aten.permute.default, aten.transpose.int, aten.squeeze.dim, aten.unsqueeze.default}


def conv_output(layer: QLayer) -> fx.Node:
    """The node whose output a conv quantizes: its relu when that is its only user, else the conv."""
    users = list(layer.node.users)
    if len(users) == 1 and users[0].target in (aten.relu.default, aten.relu_.default):
        return users[0]
    return layer.node


_RESHAPES = {aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten._unsafe_view.default}


def relu_under_pool(x: fx.Node) -> fx.Node | None:
    """The relu in ``x = [reshapes of] max_pool2d(relu(y))`` when the pool is its only reader, else None."""
    while x.op == "call_function" and x.target in _RESHAPES and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    if x.op != "call_function" or x.target is not aten.max_pool2d.default:
        return None
    relu = x.args[0]
    ok = relu.op == "call_function" and relu.target in (aten.relu.default, aten.relu_.default)
    return relu if ok and len(relu.users) == 1 else None


def _pool_before_relu(model: Model, relu: fx.Node) -> None:
    """max_pool(relu(y)) -> relu(max_pool(y)), equal as relu is monotone. With a static Q on the pool's
    output, onnxruntime (1.32) otherwise moves the Q above the pool and pools uint8 in NCHW (several
    times slower on x86 than its float NCHWc pool); after the swap it keeps the float pool and folds
    the relu into the Q (zero point 0)."""
    g = model.gm.graph
    pool = next(iter(relu.users))
    pool.replace_input_with(relu, relu.args[0])
    with g.inserting_after(pool):
        r = g.call_function(relu.target, (pool,))
    r.meta = dict(pool.meta)
    pool.replace_all_uses_with(r, delete_user_cb=lambda u: u is not r)
    g.erase_node(relu)


def chain_source(x: fx.Node, outs: set[fx.Node]) -> fx.Node | None:
    """The node of ``outs`` that ``x`` is computed from by range-keeping single-input ops, or None."""
    while x not in outs:
        if x.op != "call_function" or x.target not in _RANGE_KEEPING or not isinstance(x.args[0], fx.Node):
            return None
        x = x.args[0]
    return x


@dataclasses.dataclass(eq=False)
class QLayer:
    node: fx.Node
    kind: str            # "linear" | "conv" | "embedding"
    name: str            # user name of the weight
    weight: str          # attribute target of the weight
    w_axis: int          # output-channel axis of the stored weight
    w_index: int         # argument index of the weight
    x_index: int | None  # argument index of the quantized activation (None: weight-only)
    act: Any = None      # (scale, zero_point) | "dynamic" | None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    reason: str | None = None  # why it stays float (None: quantized)
    packed: bool = False  # 4-bit codes stored two per byte (weight-only layers)
    bits: int = 8
    group: int | None = None  # 4-bit group size along a row (None: per channel / per tensor)
    zero: torch.Tensor | None = None  # group minima of an asymmetric (embedding) table
    out: fx.Node | None = None  # conv: the node whose output is quantized too (the conv or its relu)
    out_act: tuple[float, int] | None = None  # its (scale, zero point)
    bias: str | None = None  # attribute target of a linear's bias
    bias_index: int | None = None  # its argument index
    bias_value: torch.Tensor | None = None
    wide: bool = False  # 8-bit codes stored uint8 (zero point 128), exact in onnxruntime's u8u8 kernels
    pairs: bool = False  # pair-limited 8-bit codes (_qdq.quantize_weight_pairs), exact in u8s8 without VNNI

    @property
    def x(self) -> fx.Node | None:
        return None if self.x_index is None else self.node.args[self.x_index]

    def quantize(self, model: Model, bits: int, per_channel: bool, group: int | None = None,
                 pairs: bool = False, wide: bool = False) -> None:
        """Codes and scales of the weight; ``group``: 4-bit groups along a row (embedding: asymmetric,
        linear: symmetric in the [out, in] layout MatMulNBits reads); ``pairs``: pair-limited 8-bit codes
        (a linear); ``wide``: the 8-bit codes are stored uint8 (an integer linear)."""
        w = model.get_tensor(self.weight)
        self.bits, self.group, self.pairs, self.wide = bits, group, pairs, wide
        if pairs:
            self.codes, self.scale = quantize_weight_pairs(w, self.w_axis, per_channel)
        elif group is not None and self.kind == "embedding":
            self.codes, self.scale, self.zero = quantize_groups_asym(w, group)
        elif group is not None:
            self.codes, self.scale = quantize_groups(w if self.w_axis == 0 else w.t(), bits, group)
        else:
            self.codes, self.scale = quantize_weight(w, bits, self.w_axis if per_channel else None)
        if self.bias is not None:
            self.bias_value = model.get_tensor(self.bias).detach().float()

    def w_hat(self) -> torch.Tensor:
        if self.group is None:
            return dequantize(self.codes, self.scale, self.w_axis if self.scale.dim() else None)
        u = self.codes.float().reshape(*self.scale.shape, self.group)
        if self.zero is not None:
            w = u * self.scale.float()[..., None] + self.zero.float()[..., None]
            return w.reshape(self.codes.shape)
        w = (u * self.scale[..., None]).reshape(self.codes.shape)
        return w if self.w_axis == 0 else w.t()

    @property
    def qgemm(self) -> bool:
        """A rank-2 linear with a bias and a static input range: a Gemm with an int32 bias (QGemm)."""
        val = self.x.meta.get("val") if self.x is not None else None
        return self.kind == "linear" and self.bias is not None and isinstance(self.act, tuple) \
            and val is not None and val.dim() == 2

    def int32_bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int32 codes, scale s_x s_w) of the bias of a ``qgemm`` layer, else None."""
        if not self.qgemm:
            return None
        scale = self.act[0] * self.scale
        b = self.bias_value
        lim = 2 ** 31 - 256
        return torch.clamp(torch.round(b / scale), -lim, lim).to(torch.int32), scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "dynamic":
            return dynamic_fake_quant(x)
        return fake_quant_static(x, *self.act) if self.act is not None else x


def find_layers(model: Model) -> tuple[list[QLayer], dict[str, str]]:
    """Quantizable layers, and {node: reason} for weighted nodes left alone."""
    gm = model.gm
    layers, skipped = [], {}
    for n in model.call_nodes():
        lv, cv = linear_view(n, gm), conv_view(n, gm)
        if lv is not None:
            w_index = 1 if n.target is not aten.addmm.default else 2
            b_index = None if lv.bias is None else 2 if w_index == 1 else 0  # linear(x, w, b), addmm(b, x, w)
            layers.append(QLayer(n, "linear", model.user_name(lv.weight), lv.weight,
                                 0 if lv.layout == "out_in" else 1, w_index, w_index - 1,
                                 bias=lv.bias, bias_index=b_index))
        elif cv is not None:
            if cv.transposed or n.target is aten.convolution.default:
                skipped[model.user_name(cv.weight)] = f"{n.target}: transposed/generic conv not quantized"
            else:
                layers.append(QLayer(n, "conv", model.user_name(cv.weight), cv.weight, 0, 1, 0))
        elif n.target is aten.embedding.default and is_param_node(n.args[0], gm):
            layers.append(QLayer(n, "embedding", model.user_name(n.args[0].target), n.args[0].target,
                                 0, 0, None))
    return layers, skipped


class _Sim(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, active: dict[fx.Node, QLayer]):
        super().__init__(gm)
        self.active = active
        self.w_hat = {n: layer.w_hat() for n, layer in active.items()}
        self.out_fq = {layer.out: layer.out_act for layer in active.values() if layer.out_act is not None}
        self.b_hat = {}
        for n, layer in active.items():
            qb = layer.int32_bias()
            if qb is not None:
                self.b_hat[n] = qb[0].float() * qb[1]

    def run_node(self, n: fx.Node):
        out = self._run(n)
        return fake_quant_static(out, *self.out_fq[n]) if n in self.out_fq else out

    def _run(self, n: fx.Node):
        layer = self.active.get(n)
        if layer is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        args[layer.w_index] = self.w_hat[n]
        if n in self.b_hat:
            args[layer.bias_index] = self.b_hat[n]
        if layer.x_index is not None:
            args[layer.x_index] = layer.fake_quant(args[layer.x_index])
        return n.target(*args, **kwargs)


def simulate(model: Model, layers: list[QLayer], batches: list[tuple]) -> list[torch.Tensor]:
    """Flattened outputs per batch with ``layers`` quantized (an empty list runs the float model)."""
    sim = _Sim(model.gm, {layer.node: layer for layer in layers})
    outs = []
    with torch.no_grad():
        for xs in batches:
            flat, _ = torch.utils._pytree.tree_flatten(sim.run(*xs))
            outs.append([o for o in flat if isinstance(o, torch.Tensor)])
    return outs


def rewrite(model: Model, layers: list[QLayer]) -> None:
    """Rewrite every layer; each quantized activation is quantized once for all its readers (one
    Q -> uint8 codes for the integer linears, one Q/DQ pair for convs and QGemm linears)."""
    qdq: dict[tuple, fx.Node] = {}
    codes: dict[tuple, tuple[fx.Node, fx.Node, fx.Node]] = {}
    for layer in layers:  # layers come in graph order: the first reader is where a quantizer goes
        n = layer.node
        relu = relu_under_pool(layer.x) if isinstance(layer.act, tuple) and layer.x is not None else None
        if relu is not None:
            _pool_before_relu(model, relu)
        x = layer.x
        key = (x, layer.act)
        if layer.kind == "embedding":
            _rewrite_embedding(model, layer)
        elif integer_linear(layer):
            if key not in codes:
                codes[key] = _quantize_input(model, layer)
            _rewrite_int8_linear(model, layer, codes[key])
        else:
            if x is not None and layer.act is not None:
                if key not in qdq:
                    qdq[key] = (dynamic_qdq_node(model, n, x) if layer.act == "dynamic"
                                else static_qdq_node(model, n, x, *layer.act))
                x = qdq[key]
            if layer.kind == "conv":
                _rewrite_conv(model, layer, x, qdq)
            else:
                _rewrite_linear(model, layer, x)
    model.recompile()


def _rewrite_conv(model: Model, layer: QLayer, x: fx.Node, qdq: dict[tuple, fx.Node]) -> None:
    n = layer.node
    args = list(n.args)
    args[0] = x
    axis = 0 if layer.scale.dim() else None
    args[1] = weight_node(model, n, layer.name, layer.codes, layer.scale, axis, layer.packed)
    n.args = tuple(args)
    if layer.out_act is not None:
        dq = _quantize_output(model, layer.out, *layer.out_act)
        qdq[(dq, layer.out_act)] = dq  # a consumer reading it directly needs no second pair


def integer_linear(layer: QLayer) -> bool:
    """Runs as MatMulIntegerToFloat (uint8 codes x int8 codes, bias added in the kernel): a quantized
    activation, 8-bit-stored weight codes, and not the QGemm form."""
    return layer.kind == "linear" and layer.act is not None and layer.group is None and not layer.packed \
        and not layer.qgemm


def _quantize_input(model: Model, layer: QLayer) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(uint8 codes, scale, zero point) nodes of ``layer``'s input: its static quantizer (QuantizeLinear,
    the scale and zero point stored as buffers) or DynamicQuantizeLinear."""
    g, x = model.gm.graph, layer.x
    if layer.act == "dynamic":
        with g.inserting_before(layer.node):
            q = g.call_function(torch.ops.regc.dynamic_quantize.default, (x,))
            return tuple(g.call_function(operator.getitem, (q, i)) for i in range(3))
    scale, zp = layer.act
    t = _store(model, layer, {"x_scale": torch.tensor(scale, dtype=torch.float32),
                              "x_zp": torch.tensor(zp, dtype=torch.uint8)})
    with g.inserting_before(layer.node):
        q = g.call_function(qd.quantize_per_tensor.default, (x, scale, zp, 0, 255, torch.uint8))
    return q, t["x_scale"], t["x_zp"]


def _rewrite_int8_linear(model: Model, layer: QLayer, xq: tuple[fx.Node, fx.Node, fx.Node]) -> None:
    n, g = layer.node, model.gm.graph
    bias = None if layer.bias_index is None else n.args[layer.bias_index]
    codes = layer.codes.t().contiguous() if layer.w_axis == 0 else layer.codes
    w_zp = 128 if layer.wide else 0
    if layer.wide:
        codes = (codes.to(torch.int16) + w_zp).to(torch.uint8)
    t = _store(model, layer, {"q": codes, "scale": layer.scale})
    with g.inserting_before(n):
        y = g.call_function(torch.ops.regc.linear_int8.default, (*xq, t["q"], t["scale"], w_zp, bias))
    _replace(n, y)


def _quantize_output(model: Model, out: fx.Node, scale: float, zp: int) -> fx.Node:
    """Insert Q/DQ after ``out`` for all its users; return the DQ node."""
    users = list(out.users)
    nxt = out.next
    dq = static_qdq_node(model, nxt, out, scale, zp)
    for u in users:
        u.replace_input_with(out, dq)
    return dq


def _store(model: Model, layer: QLayer, tensors: dict[str, torch.Tensor]) -> dict[str, fx.Node]:
    """Buffers ``{kind: tensor}`` named after the layer, read by get_attr nodes before it."""
    return store_buffers(model, layer.node, layer.name, tensors)


def _replace(n: fx.Node, y: fx.Node) -> None:
    """``y`` (with ``n``'s metadata) takes the place of ``n``, which is erased."""
    y.meta = dict(n.meta)
    n.replace_all_uses_with(y)
    n.graph.erase_node(n)


def _rewrite_linear(model: Model, layer: QLayer, x: fx.Node) -> None:
    n, g = layer.node, model.gm.graph
    bias = None if layer.bias_index is None else n.args[layer.bias_index]
    int32_bias = layer.int32_bias()
    if layer.group is not None:
        out_ch, k = layer.codes.shape
        u = (layer.codes.to(torch.int16) + 8).reshape(out_ch, k // layer.group, layer.group)
        t = _store(model, layer, {"q4": pack_rows(u), "scale": layer.scale.reshape(-1)})
        with g.inserting_before(n):
            y = g.call_function(torch.ops.regc.matmul_nbits.default,
                                (x, t["q4"], t["scale"], k, out_ch, layer.group))
    else:
        codes = layer.codes.t().contiguous() if layer.w_axis == 0 else layer.codes
        dq = weight_node(model, n, layer.name, codes, layer.scale, 1 if layer.scale.dim() else None,
                         layer.packed)
        with g.inserting_before(n):
            if int32_bias is not None:
                bdq = weight_node(model, n, model.user_name(layer.bias), *int32_bias,
                                  0 if int32_bias[1].dim() else None, dtype=torch.int32)
                y = g.call_function(aten.addmm.default, (bdq, x, dq))
            else:
                y = g.call_function(aten.matmul.default, (x, dq))
    if bias is not None and int32_bias is None:
        with g.inserting_before(n):
            y = g.call_function(aten.add.Tensor, (y, _row_bias(model, n, bias)))
    _replace(n, y)


def _row_bias(model: Model, n: fx.Node, bias: fx.Node) -> fx.Node:
    val = n.args[1 if n.target is aten.addmm.default else 0].meta.get("val")
    if val is None or val.dim() < 3 or len(bias.users) != 1:
        return bias
    model.set_tensor(bias.target, model.get_tensor(bias.target).detach().reshape(1, -1))
    return bias


def _rewrite_embedding(model: Model, layer: QLayer) -> None:
    n, g = layer.node, model.gm.graph
    ids = n.args[1]
    if layer.group is not None:
        t = _store(model, layer, {"q4": pack_rows(layer.codes), "scale": layer.scale, "zero": layer.zero})
        with g.inserting_before(n):
            y = g.call_function(torch.ops.regc.gather_int4.default,
                                (t["q4"], t["scale"], t["zero"], ids, layer.group))
        _replace(n, y)
        return
    per_row = layer.scale.dim() > 0
    scale = layer.scale.reshape(-1, 1) if per_row else layer.scale
    t = _store(model, layer, {"q": layer.codes, "scale": scale})
    with g.inserting_before(n):
        rows = g.call_function(aten.embedding.default, (t["q"], ids))
        rows = g.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
        s = t["scale"]
        if per_row:
            s = g.call_function(aten.embedding.default, (s, ids))
        y = g.call_function(aten.mul.Tensor, (rows, s))
    _replace(n, y)
