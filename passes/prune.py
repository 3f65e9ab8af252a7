"""prune: one-shot structured pruning that physically removes channels, attention heads and FFN units.

For every group of coupled units found by the dependency graph (``regc.passes._depgraph``), rank the
units by importance (``regc.passes._importance``: l1, l2, fisher, taylor) and remove the
floor(ratio * n) least important ones (heads use ``head_ratio``), keeping a multiple of ``round_to``
channels. Removal slices every coupled parameter and rewrites the sizes in shape ops, so the result
is a smaller dense graph. Criteria: L1 filter norm (Li et al., ICLR 2017), group norm and coupling
(Fang et al., "DepGraph", CVPR 2023), Taylor (Molchanov et al., CVPR 2019), Fisher (Theis et al., 2018).
Ops without a pruning rule are barriers: their channels are kept and the op is listed in the stats.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from regc.ir import Model
from regc.passes._depgraph import Group, build_depgraph
from regc.passes._importance import IMPORTANCE, unit_importance
from regc.registry import PassContext, PassResult, Phase, check_choice, check_range, register_pass

__all__ = ["PruneConfig", "prune", "kept_units"]


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Options for `prune`.

    Attributes:
        ratio: fraction of units removed from each channel group (conv channels, FFN units), in [0, 1).
        head_ratio: fraction of attention heads removed from each head group, in [0, 1); -1 = ratio.
        importance: l1 | l2 | fisher | taylor (fisher and taylor need data).
        round_to: keep a multiple of this many channels per group (where the group allows), >= 1.
        batch_size: calibration batch size for fisher and taylor, >= 1.
        max_samples: calibration samples for fisher and taylor; 0 = all.
    """

    ratio: float = 0.5
    head_ratio: float = -1.0
    importance: str = "l1"
    round_to: int = 1
    batch_size: int = 32
    max_samples: int = 0

    def __post_init__(self):
        check_range("prune", "ratio", self.ratio, 0.0, 1.0, hi_open=True)
        if self.head_ratio != -1.0:
            check_range("prune", "head_ratio", self.head_ratio, 0.0, 1.0, hi_open=True)
        check_choice("prune", "importance", self.importance, IMPORTANCE)
        check_range("prune", "round_to", self.round_to, 1, 4096)
        check_range("prune", "batch_size", self.batch_size, 1, float("inf"))
        check_range("prune", "max_samples", self.max_samples, 0, float("inf"))


def kept_units(n: int, width: int, ratio: float, round_to: int) -> int:
    """Units kept out of ``n``: n - floor(ratio n), rounded up so kept channels (units x width) are a
    multiple of ``round_to`` where possible; at least one unit."""
    return round_units(n - math.floor(ratio * n), n, width, round_to)


def round_units(keep: int, n: int, width: int, round_to: int) -> int:
    """``keep`` units rounded up so keep x width is a multiple of ``round_to`` where possible; in [1, n]."""
    step = round_to // math.gcd(round_to, width)
    return max(1, min(n, math.ceil(keep / step) * step))


@register_pass("prune", PruneConfig, phase=Phase.PRUNE, exact=False)
def prune(model: Model, config: PruneConfig, ctx: PassContext) -> PassResult:
    """Remove the least important units of every coupled group (channels, heads, FFN units)."""
    data = ctx.require_data("prune") if config.importance in ("fisher", "taylor") else ctx.data
    dg = build_depgraph(model)
    scores = unit_importance(model, dg.groups, config.importance, data,
                             batch_size=config.batch_size, max_samples=config.max_samples)
    removed, report = [], []
    for g, s in zip(dg.groups, scores, strict=True):
        ratio = config.head_ratio if g.kind == "head" and config.head_ratio != -1.0 else config.ratio
        keep = kept_units(len(g.units), g.unit_width, ratio, config.round_to)
        order = torch.argsort(s, descending=True, stable=True)
        removed += [g.units[int(i)] for i in order[keep:]]
        report.append(_group_entry(g, keep))
    params_before = model.num_params()
    layers = dg.remove(removed)
    return PassResult(model, bool(removed), {
        "importance": config.importance,
        "params_before": params_before,
        "params_after": model.num_params(),
        "units_removed": len(removed),
        "groups": report,
        "layers": layers,
        "barriers": list(dg.warnings),
    })


def _group_entry(g: Group, keep: int) -> dict:
    return {"name": g.name, "kind": g.kind, "units_before": len(g.units), "units_after": keep,
            "channels_before": len(g.units) * g.unit_width, "channels_after": keep * g.unit_width,
            "layers": g.layers}

