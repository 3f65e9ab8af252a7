"""The layers `quant` can quantize, their simulation, and their rewrite into QDQ form.

A ``QLayer`` is one weighted node (linear-like, conv-like, embedding) with its int8 weight codes and
the quantizer of its activation input. ``simulate`` runs the float graph with any subset of layers
quantized (weights replaced by their dequantized codes, inputs fake-quantized with the same ops the
rewritten graph uses), which is how sensitivity and fallback are measured without rewriting.
``rewrite`` turns a layer into the form onnxruntime fuses into int8 kernels:
    linear:    MatMul(DQ(Q(x)), DQ(W_int8^T, per column)) + b      -> MatMulIntegerToFloat
    conv:      Conv(DQ(Q(x)), DQ(W_int8, per out channel), b)     -> QLinearConv
    embedding: Gather(W_int8, ids) * Gather(scale, ids)            (weight-only; the table stays int8)
For rank >= 3 inputs the bias is stored as (1, N), which keeps onnxruntime's MatMul+Add->Gemm fusion
(it runs before the QDQ fusions and would hide the MatMul) from firing.
"""

from __future__ import annotations

import dataclasses
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
    free_name,
    quantize_weight,
    static_qdq_node,
    weight_node,
)

aten = torch.ops.aten

__all__ = ["QLayer", "find_layers", "simulate", "rewrite"]


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

    @property
    def x(self) -> fx.Node | None:
        return None if self.x_index is None else self.node.args[self.x_index]

    def quantize(self, model: Model, bits: int, per_channel: bool) -> None:
        self.codes, self.scale = quantize_weight(model.get_tensor(self.weight), bits,
                                                 self.w_axis if per_channel else None)

    def w_hat(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.w_axis if self.scale.dim() else None)

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
            layers.append(QLayer(n, "linear", model.user_name(lv.weight), lv.weight,
                                 0 if lv.layout == "out_in" else 1, w_index, w_index - 1))
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

    def run_node(self, n: fx.Node):
        layer = self.active.get(n)
        if layer is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        args[layer.w_index] = self.w_hat[n]
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
    """Rewrite every layer into QDQ form (one shared Q/DQ pair per quantized activation)."""
    qdq: dict[tuple, fx.Node] = {}
    for layer in layers:
        n = layer.node
        x = layer.x
        if x is not None and layer.act is not None:
            key = (x, layer.act)
            if key not in qdq:  # layers come in graph order: n is the first consumer
                qdq[key] = (dynamic_qdq_node(model, n, x) if layer.act == "dynamic"
                            else static_qdq_node(model, n, x, *layer.act))
            x = qdq[key]
        if layer.kind == "embedding":
            _rewrite_embedding(model, layer)
        elif layer.kind == "conv":
            args = list(n.args)
            args[0] = x
            axis = 0 if layer.scale.dim() else None
            args[1] = weight_node(model, n, layer.name, layer.codes, layer.scale, axis, layer.packed)
            n.args = tuple(args)
        else:
            _rewrite_linear(model, layer, x)
    model.recompile()


def _rewrite_linear(model: Model, layer: QLayer, x: fx.Node) -> None:
    n, g = layer.node, model.gm.graph
    codes = layer.codes.t().contiguous() if layer.w_axis == 0 else layer.codes
    dq = weight_node(model, n, layer.name, codes, layer.scale, 1 if layer.scale.dim() else None, layer.packed)
    bias = n.args[0] if n.target is aten.addmm.default else (n.args[2] if n.target is aten.linear.default
                                                                and len(n.args) > 2 else None)
    with g.inserting_before(n):
        y = g.call_function(aten.matmul.default, (x, dq))
        if bias is not None:
            y = g.call_function(aten.add.Tensor, (y, _row_bias(model, n, bias)))
    y.meta = dict(n.meta)
    n.replace_all_uses_with(y)
    g.erase_node(n)


def _row_bias(model: Model, n: fx.Node, bias: fx.Node) -> fx.Node:
    val = n.args[1 if n.target is aten.addmm.default else 0].meta.get("val")
    if val is None or val.dim() < 3 or len(bias.users) != 1:
        return bias
    model.set_tensor(bias.target, model.get_tensor(bias.target).detach().reshape(1, -1))
    return bias


def _rewrite_embedding(model: Model, layer: QLayer) -> None:
    n, g = layer.node, model.gm.graph
    per_row = layer.scale.dim() > 0
    names = {}
    for kind, t in (("q", layer.codes), ("scale", layer.scale.reshape(-1, 1) if per_row else layer.scale)):
        names[kind] = free_name(model, f"{layer.name}_{kind}")
        model.set_tensor(names[kind], t, trainable=False)
        model.param_names[names[kind]] = f"{layer.name}:{kind}"
    ids = n.args[1]
    with g.inserting_before(n):
        rows = g.call_function(aten.embedding.default, (g.get_attr(names["q"]), ids))
        rows = g.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
        s = g.get_attr(names["scale"])
        if per_row:
            s = g.call_function(aten.embedding.default, (s, ids))
        y = g.call_function(aten.mul.Tensor, (rows, s))
    y.meta = dict(n.meta)
    n.replace_all_uses_with(y)
    g.erase_node(n)
