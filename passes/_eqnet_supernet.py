"""EQ-Net's supernet in the graph: elastic quantizers on every conv/linear weight and input, switched to
one subnet configuration at a time; BN recalibration per subnet; lowering one subnet to integer weights.

Installing inserts ``call_module`` nodes ``get_attr W -> _eqnet_w<i> -> layer`` and
``x -> _eqnet_a<i> -> layer``; their scales and offsets are submodules of ``model.gm``, so the shared
training driver trains them with the weights. Removing restores the float graph exactly.

Subnet sampling (sandwich rule): global conditions (weight granularity, weight symmetry, activation
symmetry) are drawn per subnet and applied to all layers, as search and evaluation use them (the
official code draws them per layer while training: not copied). H takes the highest bit-width at every
elastic layer, L the lowest, R a uniform draw per layer for weights and activations independently.
With ``fix_ends`` the first and last layers stay at 8/8 bits and count in no average.

Averages: weight bits weighted by parameter count, activation bits by per-sample feature-map size,
over the elastic layers.

BN recalibration: with the subnet switched on, every ``aten.batch_norm`` runs in training mode over the
calibration batches with momentum 1 at every batch; the running statistics are then set to the
mean of the per-batch statistics (one batch: exactly its statistics).

Lowering a subnet (its quantizers are then removed): the weight becomes int8 codes
q = clamp(round((W - beta) / s), Q_n, Q_p) (4 bits or fewer: packed two per byte) read through a
dequantize node (an 8-bit per-tensor scale is stored repeated per channel, which ONNX export
takes), plus ``+ beta`` for asymmetric weights (a float offset, as LSQ+ learns it), and the
layer input becomes the elementwise ops round(clamp((x - beta) / s, Q_n, Q_p)) s + beta. Both compute
exactly what the fake quantizers compute, so the lowered graph gives the supernet subnet's outputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from regc.ir import Model
from regc.passes._eqnet_quant import ActQuantizer, SubnetConfig, WeightQuantizer, qrange
from regc.passes._qdq import free_name, weight_node
from regc.passes._quant_layers import QLayer

aten = torch.ops.aten

__all__ = ["Supernet", "Space"]


class Space:
    """The elastic space: bit-widths and the allowed global conditions."""

    def __init__(self, bits: Sequence[int], w_channel: Sequence[bool], w_sym: Sequence[bool],
                 a_sym: Sequence[bool]):
        self.bits = tuple(sorted(set(bits)))
        self.w_channel, self.w_sym, self.a_sym = tuple(w_channel), tuple(w_sym), tuple(a_sym)


class _Record(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]):
        super().__init__(gm)
        self.nodes, self.values = nodes, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.nodes:
            self.values[n] = out.detach()
        return out


def _pick(options: tuple, g: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=g))]


class Supernet:
    """Elastic quantizers for ``layers`` of ``model`` (conv/linear ``QLayer``s in graph order)."""

    def __init__(self, model: Model, layers: list[QLayer], space: Space, fix_ends: bool,
                 calib: tuple[torch.Tensor, ...]):
        self.model, self.layers, self.space = model, layers, space
        n = len(layers)
        self.free = [not (fix_ends and i in (0, n - 1)) for i in range(n)]
        rec = _Record(model.gm, {q.x for q in layers})
        with torch.no_grad():
            rec.run(*calib)
        bits = tuple(sorted(set(space.bits) | ({8} if fix_ends else set())))  # fixed ends run at 8 bits
        self.wq = [WeightQuantizer(model.get_tensor(q.weight), q.w_axis, bits) for q in layers]
        self.aq = [ActQuantizer(rec.values[q.x], bits) for q in layers]
        self.w_cost = [model.get_tensor(q.weight).numel() for q in layers]
        self.a_cost = [rec.values[q.x][0].numel() for q in layers]
        self.names = [q.name[: -len(".weight")] if q.name.endswith(".weight") else q.name for q in layers]
        self._nodes: list[tuple[fx.Node, fx.Node]] = []

    # ---- graph ---------------------------------------------------------------------------------
    def install(self) -> None:
        gm, g = self.model.gm, self.model.gm.graph
        for i, q in enumerate(self.layers):
            wname, aname = free_name(self.model, f"_eqnet_w{i}"), free_name(self.model, f"_eqnet_a{i}")
            gm.add_module(wname, self.wq[i])
            gm.add_module(aname, self.aq[i])
            w, x = q.node.args[q.w_index], q.x
            with g.inserting_before(q.node):
                wn, an = g.call_module(wname, (w,)), g.call_module(aname, (x,))
            wn.meta, an.meta = dict(w.meta), dict(x.meta)
            args = list(q.node.args)
            args[q.w_index], args[q.x_index] = wn, an
            q.node.args = tuple(args)
            self._nodes.append((wn, an))
        gm.recompile()

    def remove(self) -> None:
        gm, g = self.model.gm, self.model.gm.graph
        for wn, an in self._nodes:
            for node in (wn, an):
                node.replace_all_uses_with(node.args[0])
                g.erase_node(node)
                delattr(gm, node.target)
        self._nodes = []
        gm.recompile()

    # ---- configurations ------------------------------------------------------------------------
    def set(self, cfg: SubnetConfig | None) -> None:
        """Switch every quantizer to ``cfg`` (None: the float model)."""
        for i, (wq, aq) in enumerate(zip(self.wq, self.aq, strict=True)):
            if cfg is None:
                wq.cfg = aq.cfg = None
            else:
                wq.cfg = (cfg.w_bits[i], cfg.w_sym, cfg.w_channel)
                aq.cfg = (cfg.a_bits[i], cfg.a_sym)

    def make(self, w_channel: bool, w_sym: bool, a_sym: bool, w_bits: Sequence[int], a_bits: Sequence[int]
             ) -> SubnetConfig:
        """A config with the fixed layers forced to 8 bits."""
        w = tuple(b if f else 8 for b, f in zip(w_bits, self.free, strict=True))
        a = tuple(b if f else 8 for b, f in zip(a_bits, self.free, strict=True))
        return SubnetConfig(w_channel, w_sym, a_sym, w, a)

    def uniform(self, bits: int, w_channel: bool, w_sym: bool, a_sym: bool) -> SubnetConfig:
        n = len(self.layers)
        return self.make(w_channel, w_sym, a_sym, [bits] * n, [bits] * n)

    def sample(self, kind: str, g: torch.Generator) -> SubnetConfig:
        """A subnet of the sandwich: kind 'max' (H), 'min' (L) or 'random' (R)."""
        sp, n = self.space, len(self.layers)
        cond = (_pick(sp.w_channel, g), _pick(sp.w_sym, g), _pick(sp.a_sym, g))
        if kind == "random":
            return self.make(*cond, [_pick(sp.bits, g) for _ in range(n)],
                             [_pick(sp.bits, g) for _ in range(n)])
        b = sp.bits[-1] if kind == "max" else sp.bits[0]
        return self.make(*cond, [b] * n, [b] * n)

    def avg_bits(self, cfg: SubnetConfig) -> tuple[float, float]:
        """(weight bits averaged by parameters, activation bits averaged by feature-map size) over the
        elastic layers."""
        idx = [i for i, f in enumerate(self.free) if f]
        w = sum(cfg.w_bits[i] * self.w_cost[i] for i in idx) / sum(self.w_cost[i] for i in idx)
        a = sum(cfg.a_bits[i] * self.a_cost[i] for i in idx) / sum(self.a_cost[i] for i in idx)
        return w, a

    # ---- evaluation ----------------------------------------------------------------------------
    def recalibrate(self, batches: list[tuple[torch.Tensor, ...]]) -> None:
        """Running BN statistics of the current subnet from ``batches`` (cumulative mean)."""
        gm = self.model.gm
        bns = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.batch_norm.default]
        if not bns or not batches:
            return
        saved = [n.args for n in bns]
        # momentum 1: each batch overwrites the running statistics with its own; their mean is kept here,
        # so the graph is recompiled once, not once per batch
        stats = list({a.target: self.model.get_tensor(a.target) for n in bns for a in n.args[3:5]
                      if isinstance(a, fx.Node)}.values())
        sums = [torch.zeros_like(t) for t in stats]
        try:
            for n in bns:
                args = list(n.args)
                args[5], args[6] = True, 1.0
                n.args = tuple(args)
            gm.recompile()
            with torch.no_grad():
                for xs in batches:
                    gm(*xs)
                    for acc, t in zip(sums, stats, strict=True):
                        acc += t
                for acc, t in zip(sums, stats, strict=True):
                    t.copy_(acc / len(batches))
        finally:
            for n, a in zip(bns, saved, strict=True):
                n.args = a
            gm.recompile()

    def accuracy(self, cfg: SubnetConfig | None, calib: list[tuple], batches: list[tuple],
                 labels: torch.Tensor) -> float:
        """Top-1 accuracy of subnet ``cfg`` on ``batches`` after BN recalibration on ``calib``."""
        self.set(cfg)
        self.recalibrate(calib)
        with torch.no_grad():
            pred = torch.cat([self.model.run(*xs)[0].argmax(-1) for xs in batches])
        return float((pred == labels).float().mean())

    # ---- lowering ------------------------------------------------------------------------------
    def lower(self, cfg: SubnetConfig) -> dict[str, dict]:
        """Replace the quantizers by subnet ``cfg`` in integer form; returns per-layer formats."""
        with torch.no_grad():
            codes = [wq.codes(self.model.get_tensor(q.weight), b, cfg.w_sym, cfg.w_channel)
                     for q, wq, b in zip(self.layers, self.wq, cfg.w_bits, strict=True)]
            acts = [tuple(float(t) for t in aq.qparams(b, cfg.a_sym))
                    for aq, b in zip(self.aq, cfg.a_bits, strict=True)]
        self.remove()
        out = {}
        for i, q in enumerate(self.layers):
            q_codes, s, beta = codes[i]
            axis = q.w_axis if cfg.w_channel else None
            packed = cfg.w_bits[i] <= 4
            if axis is None and not packed:  # one scale repeated per channel: the per-channel DQ exports
                axis, s = q.w_axis, s.expand(q_codes.shape[q.w_axis]).clone()
            w = weight_node(self.model, q.node, q.name, q_codes, s, axis, packed)
            if not cfg.w_sym:
                w = self._add_offset(q, w, beta, axis)
            x = self._act_nodes(q, *acts[i], *qrange(cfg.a_bits[i], self.aq[i].signed))
            args = list(q.node.args)
            args[q.w_index], args[q.x_index] = w, x
            q.node.args = tuple(args)
            out[self.names[i]] = {
                "w_bits": cfg.w_bits[i], "a_bits": cfg.a_bits[i], "elastic": self.free[i],
                "format": f"int{cfg.w_bits[i]}" + ("_packed" if packed else ""),
                "act_range": "signed" if self.aq[i].signed else "unsigned"}
        self.model.gm.graph.eliminate_dead_code()
        self.model.recompile()
        return out

    def _add_offset(self, q: QLayer, w: fx.Node, beta: torch.Tensor, axis: int | None) -> fx.Node:
        g = self.model.gm.graph
        name = free_name(self.model, f"{q.name}_offset")
        shape = [1] * self.model.get_tensor(q.weight).dim()
        if axis is not None:
            shape[axis] = -1
        self.model.set_tensor(name, beta.reshape(shape).clone(), trainable=False)
        self.model.param_names[name] = f"{q.name}:offset"
        with g.inserting_before(q.node):
            return g.call_function(aten.add.Tensor, (w, g.get_attr(name)))

    def _act_nodes(self, q: QLayer, s: float, beta: float, qn: int, qp: int) -> fx.Node:
        g, x = self.model.gm.graph, q.x
        with g.inserting_before(q.node):
            v = g.call_function(aten.sub.Tensor, (x, beta)) if beta != 0 else x
            v = g.call_function(aten.div.Tensor, (v, s))
            v = g.call_function(aten.clamp.default, (v, float(qn), float(qp)))
            v = g.call_function(aten.round.default, (v,))
            v = g.call_function(aten.mul.Tensor, (v, s))
            return g.call_function(aten.add.Tensor, (v, beta)) if beta != 0 else v
