"""harden: physically remove the channels, heads and FFN units that training left zero or constant.

After group-sparse training (``wgsef``, ``regularize{kind=group_lasso}``, ...) a unit whose producing
slices (filters or rows, biases, norm affine parameters: the "out" slots of the dependency graph in
``regc.passes._depgraph``) are all zero outputs exactly zero, so removing it, with the input columns
of the layers that read it, changes no output: the graph gets smaller and stays exact.

Constant units. A unit whose producing weights (out slots of rank > 1) are zero but whose biases or
BatchNorm shift are not outputs a value c that does not depend on the input (bias -> BN -> ReLU ->
max-pool keep it constant). Each consumer layer reads it as x_c = c, so

    linear   y = W x + b = W_rest x_rest + (b + W[:, c] c)
    conv     y = W * x + b = W_rest * x_rest + (b + sum_{kernel} W[:, c] c)     (padding 0 only)

and the unit is removed after adding delta = W[:, c] c (summed over the kernel) to the consumer's
bias, or, for a consumer without bias that feeds an eval-mode BatchNorm, after subtracting delta from
that BatchNorm's running mean. Sound only where every consumer sees c at every position: a padded
convolution reads zeros at the border (not c), so a unit read by one is kept; so is a unit whose
value at a consumer is not the same over the example batch and every position (checked on the
example inputs, on top of the structural condition). Kept constant units are listed with the reason.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from regc.ir import Model
from regc.opclass import conv_view, linear_view
from regc.passes._depgraph import Group, build_depgraph, run_example
from regc.registry import PassContext, PassResult, Phase, register_pass

__all__ = ["HardenConfig", "harden"]

aten = torch.ops.aten
_CONV_PAD_ARG = {aten.convolution.default: 4}
_CONV_GROUPS_ARG = {aten.convolution.default: 8}


@dataclasses.dataclass(frozen=True)
class HardenConfig:
    """Options for `harden` (none)."""


@register_pass("harden", HardenConfig, phase=Phase.PRUNE, exact=True)
def harden(model: Model, config: HardenConfig, ctx: PassContext) -> PassResult:
    """Remove every unit whose producing parameters are zero, folding constant units into consumers."""
    dg = build_depgraph(model)
    folder = _Folder(model)
    removed, report, kept_constant, folds = [], [], [], []
    for g in dg.groups:
        mass, weights = _masses(model, g)
        zero = [i for i, m in enumerate(mass.tolist()) if m == 0]
        constant = [i for i, (w, m) in enumerate(zip(weights.tolist(), mass.tolist(), strict=True))
                    if w == 0 and m > 0]
        for i in constant:
            delta = folder.deltas(g, i)
            if isinstance(delta, str):
                kept_constant.append({"group": g.name, "unit": i, "reason": delta})
            else:
                zero.append(i)
                folds.append((i, g, delta))
        zero = sorted(zero)[: len(g.units) - 1]  # a group keeps at least one unit
        removed += [g.units[i] for i in zero]
        folds = [(i, h, d) for i, h, d in folds if h is not g or i in zero]
        if zero:
            report.append({"name": g.name, "kind": g.kind, "units_before": len(g.units),
                           "units_after": len(g.units) - len(zero)})
    with torch.no_grad():
        for _, _, delta in folds:
            for target, sign, value in delta:
                model.get_tensor(target).add_(sign * value)
    params_before = model.num_params()
    layers = dg.remove(removed)
    return PassResult(model, bool(removed), {
        "units_removed": len(removed), "constant_units_folded": len(folds),
        "constant_units": len(kept_constant), "constant_units_kept": kept_constant,
        "params_before": params_before, "params_after": model.num_params(), "groups": report,
        "layers": layers, "barriers": list(dg.warnings),
    })


def _masses(model: Model, g: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit: sum |p| over all producing parameters, and over the producing weights (rank > 1)."""
    params = {s.target for s, _ in g.members if isinstance(model.get_tensor(s.target), torch.nn.Parameter)}
    mass = g.reduce({t: model.get_tensor(t).detach().abs() for t in params})
    weights = g.reduce({t: model.get_tensor(t).detach().abs() for t in params
                        if model.get_tensor(t).dim() > 1})
    return mass, weights


Delta = list[tuple[str, float, torch.Tensor]]  # (tensor to add to, sign, value)


class _Folder:
    """The bias corrections that let a constant unit go; its consumers' inputs are recorded once."""

    def __init__(self, model: Model):
        self.model = model
        self.consumers: dict[str, list[fx.Node]] = {}
        for n in model.call_nodes():
            v = linear_view(n, model.gm) or conv_view(n, model.gm)
            if v is not None:
                self.consumers.setdefault(v.weight, []).append(n)
        self._inputs: dict[fx.Node, torch.Tensor] | None = None

    def inputs(self, node: fx.Node) -> torch.Tensor:
        if self._inputs is None:
            want = {(linear_view(n, self.model.gm) or conv_view(n, self.model.gm)).input
                    for ns in self.consumers.values() for n in ns}
            self._inputs = _record(self.model, want)
        view = linear_view(node, self.model.gm) or conv_view(node, self.model.gm)
        return self._inputs[view.input]

    def deltas(self, g: Group, unit: int) -> Delta | str:
        """The corrections for every consumer of ``unit``, or the reason it cannot be folded."""
        out: Delta = []
        for slot, idx in g.members:
            pos = (idx == unit).nonzero().flatten()
            if slot.role != "in" or pos.numel() == 0:
                continue
            nodes = self.consumers.get(slot.target, [])
            if len(nodes) != 1:
                return f"{slot.layer}: read by {len(nodes)} layers"
            d = self._delta(nodes[0], slot.dim, pos)
            if isinstance(d, str):
                return f"{slot.layer}: {d}"
            out.append(d)
        return out if out else "no consumer layer reads it"

    def _delta(self, node: fx.Node, dim: int, pos: torch.Tensor) -> tuple[str, float, torch.Tensor] | str:
        m = self.model
        lin = linear_view(node, m.gm)
        view = lin or conv_view(node, m.gm)
        w = m.get_tensor(view.weight).detach()
        x = self.inputs(node)
        if lin is not None:
            c = _constant(x.movedim(-1, 0)[pos])
            if c is None:
                return "its value differs between inputs"
            delta = w.index_select(dim, pos).movedim(dim, -1) @ c.to(w.dtype)
        else:
            if view.transposed or _arg(node, _CONV_GROUPS_ARG, 6, 1) != 1:
                return "transposed or grouped convolution"
            pad = _arg(node, _CONV_PAD_ARG, 4, 0)
            if isinstance(pad, str) and pad != "valid" or not isinstance(pad, str) and any(
                    int(p) != 0 for p in ([pad] if isinstance(pad, int) else pad)):
                return "padded convolution (the border reads zeros, not the constant)"
            c = _constant(x.movedim(1, 0)[pos])
            if c is None:
                return "its value differs between inputs or positions"
            k = w.index_select(1, pos)
            delta = (k.sum(list(range(2, k.dim()))) * c.to(w.dtype)).sum(1)
        if view.bias is not None:
            return view.bias, 1.0, delta.reshape(m.get_tensor(view.bias).shape)
        users = list(node.users)
        bn = users[0] if len(users) == 1 else None
        if (bn is not None and bn.target is aten.batch_norm.default and bn.args[0] is node
                and isinstance(bn.args[3], fx.Node) and not bn.args[5]):
            return bn.args[3].target, -1.0, delta
        return "the consumer has no bias and no eval-mode BatchNorm after it to absorb the constant"


def _constant(x: torch.Tensor) -> torch.Tensor | None:
    """x: (channels, ...): the per-channel value when every channel is constant, else None."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0 or not bool((flat == flat[:, :1]).all()):
        return None
    return flat[:, 0]


def _arg(node: fx.Node, table: dict, default_index: int, default: object) -> object:
    i = table.get(node.target, default_index)
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get("padding" if table is _CONV_PAD_ARG else "groups", default)


def _record(model: Model, want: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of the nodes in ``want`` on the example inputs (eval mode)."""
    vals: dict[fx.Node, torch.Tensor] = {}

    def keep(n: fx.Node, out: object) -> None:
        if n in want:
            vals[n] = out.detach()

    run_example(model, keep)
    return vals
