"""harden: physically remove the channels, heads and FFN units that training left exactly zero.

After group-sparse training (``regularize{kind=wgsef}``, group lasso, ...) a unit whose producing slices
(filters or rows, biases, norm affine parameters: the "out" slots of the dependency graph in
``regc.passes._depgraph``) are all zero outputs exactly zero, so removing it, with the input columns
of the layers that read it, changes no output: the graph gets smaller and stays exact. A unit with a
zero filter but a non-zero BatchNorm bias outputs a constant and is kept (listed as ``constant_units``).
"""

from __future__ import annotations

import dataclasses

import torch

from regc.ir import Model
from regc.passes._depgraph import build_depgraph
from regc.registry import PassContext, PassResult, Phase, register_pass

__all__ = ["HardenConfig", "harden"]


@dataclasses.dataclass(frozen=True)
class HardenConfig:
    """Options for `harden` (none)."""


@register_pass("harden", HardenConfig, phase=Phase.PRUNE, exact=True)
def harden(model: Model, config: HardenConfig, ctx: PassContext) -> PassResult:
    """Remove every unit whose producing parameters are all zero (exact)."""
    dg = build_depgraph(model)
    removed, report, constant = [], [], 0
    for g in dg.groups:
        params = {s.target for s, _ in g.members
                  if isinstance(model.get_tensor(s.target), torch.nn.Parameter)}
        mass = g.reduce({t: model.get_tensor(t).detach().abs() for t in params})
        weights_only = g.reduce({t: model.get_tensor(t).detach().abs() for t in params
                                 if model.get_tensor(t).dim() > 1})
        zero = [u for u, m in zip(g.units, mass.tolist(), strict=True) if m == 0]
        pairs = zip(weights_only.tolist(), mass.tolist(), strict=True)
        constant += sum(1 for w, m in pairs if w == 0 and m > 0)
        zero = zero[: len(g.units) - 1]  # a group keeps at least one unit
        removed += zero
        if zero:
            report.append({"name": g.name, "kind": g.kind, "units_before": len(g.units),
                           "units_after": len(g.units) - len(zero)})
    params_before = model.num_params()
    layers = dg.remove(removed)
    return PassResult(model, bool(removed), {
        "units_removed": len(removed), "constant_units": constant, "params_before": params_before,
        "params_after": model.num_params(), "groups": report, "layers": layers, "barriers": list(dg.warnings),
    })
