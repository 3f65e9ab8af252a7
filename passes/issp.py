"""issp: Iterative Soft Shrinkage-Percentage unstructured sparsity (Wang et al., "Iterative Soft
Shrinkage Learning for Efficient Image Super-Resolution", ICCV 2023), as in the official code.

Pruning stage, steps k < K_p: after each optimizer step, per layer l, the ceil(s n_l) smallest |w|
(a constant percentage s from the first step; or, with nm=N:M, the M-N smallest of every M
consecutive weights of a row) are shrunk, not zeroed:  w_P <- alpha w_P. A weight that stays
unimportant for t steps decays as alpha^t; alpha = 0 is iterative hard thresholding (IHT).
At the end of the stage the last selection becomes a hard mask, w <- m * w, and in the fine-tuning
stage the mask is re-applied after every step. First and last layers are skipped by default.

The graph keeps its dense shape: masks go to ``model.annotations[target]["mask"]`` and the stats report
storage (non-zero values + a 1-bit mask) against dense fp32. Storage only: dense kernels run no faster.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from regc.errors import ConfigError
from regc.ir import Model
from regc.opclass import conv_view, linear_view
from regc.registry import PassContext, PassResult, Phase, check_range, register_pass
from regc.train import TrainPlan, fit, planned_steps, spec_for

__all__ = ["IsspConfig", "issp", "shrink_set", "ShrinkSchedule"]


@dataclasses.dataclass(frozen=True)
class IsspConfig:
    """Options for `issp`.

    Attributes:
        sparsity: fraction of each layer's weights pruned, in (0, 1) (ignored when nm is set).
        alpha: soft-shrink factor per step for the currently pruned weights, in [0, 1); 0 = hard (IHT).
        nm: N:M pattern such as 2:4 (keep N of every M consecutive weights of a row); empty = unstructured.
        prune_fraction: share of the training steps spent in the pruning stage, in (0, 1].
        skip_first_last: leave the first and the last weighted layer dense.
    """

    sparsity: float = 0.9
    alpha: float = 0.95
    nm: str = ""
    prune_fraction: float = 0.5
    skip_first_last: bool = True

    def __post_init__(self):
        check_range("issp", "sparsity", self.sparsity, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("issp", "alpha", self.alpha, 0.0, 1.0, hi_open=True)
        check_range("issp", "prune_fraction", self.prune_fraction, 0.0, 1.0, lo_open=True)
        if self.nm:
            n, _, m = self.nm.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ConfigError(f"issp.nm must be N:M with 0 < N < M (e.g. 2:4), got {self.nm!r}")

    @property
    def pattern(self) -> tuple[int, int] | None:
        if not self.nm:
            return None
        n, _, m = self.nm.partition(":")
        return int(n), int(m)


def shrink_set(w: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, rows_dim: int = 0
               ) -> torch.Tensor:
    """Boolean mask of the weights to prune: the ceil(s n) smallest |w| (ties by index), or per group of
    M consecutive weights along each row (rows along ``rows_dim``), the M - N smallest."""
    a = w.detach().abs()
    if pattern is None:
        flat = a.reshape(-1)
        k = min(math.ceil(sparsity * flat.numel()), flat.numel() - 1)
        if k == 0:
            return torch.zeros_like(a, dtype=torch.bool)
        t = torch.kthvalue(flat, k).values  # O(n) selection, not a sort: this runs every step
        out = flat < t
        out[(flat == t).nonzero().squeeze(1)[: k - int(out.sum())]] = True  # ties: lowest index first
        return out.reshape(a.shape)
    n, m = pattern
    rows = a.movedim(rows_dim, 0).reshape(a.shape[rows_dim], -1)
    groups = rows.reshape(-1, m)
    order = torch.argsort(groups, dim=1, stable=True)[:, : m - n]
    sel = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    moved = list(a.movedim(rows_dim, 0).shape)
    return sel.reshape(moved).movedim(0, rows_dim)


class ShrinkSchedule:
    """The after-step hook: soft shrink during the pruning stage, hard mask afterwards."""

    def __init__(self, targets: dict[str, int], config: IsspConfig, prune_steps: int):
        self.targets = targets  # target -> rows dim
        self.config = config
        self.prune_steps = prune_steps
        self.masks: dict[str, torch.Tensor] = {}  # True = pruned
        self.churn: list[float] = []

    def __call__(self, model: Model, step) -> None:
        k = int(step)
        if k >= self.prune_steps:
            for t, m in self.masks.items():
                model.get_tensor(t).masked_fill_(m, 0.0)
            return
        changed = total = 0
        for t, rows in self.targets.items():
            w = model.get_tensor(t)
            sel = shrink_set(w, self.config.sparsity, self.config.pattern, rows)
            if t in self.masks:
                changed += int((sel != self.masks[t]).sum())
                total += sel.numel()
            self.masks[t] = sel
            w.mul_(torch.where(sel, self.config.alpha, 1.0))
            if k == self.prune_steps - 1:
                w.masked_fill_(sel, 0.0)
        if total:
            self.churn.append(changed / total)

    def state_dict(self) -> dict:
        return {"masks": dict(self.masks)}

    def load_state_dict(self, state: dict) -> None:
        self.masks = dict(state["masks"])


def prunable(model: Model, config: IsspConfig) -> tuple[dict[str, int], list[str]]:
    """Weighted layers (target -> rows dim), minus the first/last; and layers skipped with a reason."""
    found, skipped = {}, []
    for n in model.call_nodes():
        v = linear_view(n, model.gm) or conv_view(n, model.gm)
        if v is not None and v.weight not in found:
            found[v.weight] = 1 if getattr(v, "layout", "") == "in_out" else 0
    names = list(found)
    if config.skip_first_last and len(names) > 2:
        for t in (names[0], names[-1]):
            skipped.append(f"{model.user_name(t)}: first/last layer")
            found.pop(t)
    if config.pattern:
        m = config.pattern[1]
        for t in list(found):
            w = model.get_tensor(t)
            if (w.numel() // w.shape[found[t]]) % m:
                skipped.append(f"{model.user_name(t)}: row length not a multiple of {m}")
                found.pop(t)
    return found, skipped


@register_pass("issp", IsspConfig, phase=Phase.SPARSIFY, exact=False)
def issp(model: Model, config: IsspConfig, ctx: PassContext) -> PassResult:
    """Train with iterative soft shrinkage to a per-layer sparsity, then a frozen hard mask."""
    spec = spec_for(ctx, "issp")
    targets, skipped = prunable(model, config)
    total = planned_steps(model, spec, "issp")
    schedule = ShrinkSchedule(targets, config, max(1, round(config.prune_fraction * total)))
    plan = TrainPlan()
    plan.add_after_step("issp", schedule, order=10)
    plan.add_state("issp", schedule)
    summary = fit(model, spec, plan)
    with torch.no_grad():  # hard mask at the end even when the run was shorter than planned
        for t, m in schedule.masks.items():
            model.get_tensor(t).masked_fill_(m, 0.0)
    layers, dense_b, packed_b = {}, 0, 0
    for t, m in schedule.masks.items():
        w = model.get_tensor(t)
        nnz = int((~m).sum())
        size = w.element_size()  # the same values + 1-bit mask count as the exporter's packing (_sparse_pack)
        dense, packed = size * w.numel(), size * nnz + math.ceil(w.numel() / 8)
        dense_b, packed_b = dense_b + dense, packed_b + packed
        model.annotations.setdefault(t, {}).update(
            {"mask": ~m, "sparsity": 1 - nnz / w.numel(), "pattern": config.nm or "unstructured"})
        layers[model.user_name(t)] = {"params": w.numel(), "nonzero": nnz,
                                      "sparsity": round(1 - nnz / w.numel(), 4),
                                      "bytes_dense": dense, "bytes_packed": packed}
    return PassResult(model, bool(schedule.masks), {
        "steps": summary["steps"], "prune_steps": schedule.prune_steps, "loss_last": summary["loss_last"],
        "layers": layers, "skipped": skipped,
        "storage": {"bytes_dense": dense_b, "bytes_packed": packed_b,
                    "compression": round(dense_b / packed_b, 3) if packed_b else 1.0,
                    "note": "values + 1-bit mask; storage only, dense kernels are not faster"},
        "mask_churn_last": schedule.churn[-1] if schedule.churn else 0.0,
    })
