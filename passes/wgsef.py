"""wgsef: prox-SGD with the group sparse envelope over dependency-graph units, to exactly k units per group.

Units and groups are those of ``regc.passes._depgraph`` (the ones ``prune`` and ``harden`` use): a
unit is a coupled channel (a residual channel across every block), an FFN unit or an attention head;
units made by the same layer(s) form a group g with n_g units. The variable of unit j is
theta_j = its producing ("out") parameter slices: filters/rows, biases, norm affine. A unit with
theta_j = 0 outputs exactly zero, so ``harden`` removes it without changing any output.
Target per group: k_g = max(1, round(keep n_g)), rounded up so the kept channels (k_g x unit width) are a
multiple of ``round_to`` where possible (onnxruntime's conv kernels run multiples of 8 channels fastest).

After each optimizer step t (learning rate gamma_t) of T, for every selected group:

    lambda_t = strength * 10^(-2 (1 - min(1, t / (ramp T))))       geometric continuation, 1e-2 -> 1
    t <  project T:  theta <- prox_{gamma_t lambda_t S_k}(theta)
                     theta_j <- theta_j u_j / (u_j + gamma_t lambda_t),
                     u_j = clip(eta ||theta_j|| - gamma_t lambda_t, 0, 1),  sum_j u_j = k   (O(n_g))
    t >= project T:  theta <- P_k(theta): keep the k units of largest ||theta_j||, zero the rest; the
                     support chosen at the first projected step is held (masked fine-tuning)

and once more after the run, so exactly k_g units per group are non-zero whatever the schedule.
S_k is Beck & Refael's sparse envelope on the unit norms (``_reg_math.sef_*``; TECHNIQUES.md sec. 4).

Why the projection is the envelope's own limit: for c -> inf the root eta of sum_j u_j = k makes
u_j -> 1 for the k largest ||theta_j|| and 0 for the rest (when ||theta_(k)|| > ||theta_(k+1)||), so
(1 + c) prox_{c S_k}(theta) -> P_k(theta): the lambda -> inf prox without its global 1/(1+c) scale.

Departure from Refael et al. (TMLR 2024): they train with a fixed lambda and state that k groups
remain at convergence. With a moderate fixed lambda the prox zeroes only units with
eta ||theta_j|| <= c and keeps every unit with u_j > 0 (at least k, in practice up to ~n/2); exactly k
needs lambda so large that the run is mostly shrinkage. Here lambda rises (continuation, so early
steps select softly) and the last phase is the lambda -> inf limit, which makes k exact by
construction; the units it zeroes were already shrunk by the envelope, so the cut costs little.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch

from regc.errors import ConfigError
from regc.ir import Model
from regc.passes import _reg_math as rm
from regc.passes._depgraph import Group, build_depgraph
from regc.passes.prune import round_units
from regc.registry import PassContext, PassResult, Phase, check_range, register_pass
from regc.train import Step, TrainPlan, fit, planned_steps, spec_for

__all__ = ["WgsefConfig", "wgsef", "UnitGroup"]

GROUP_KINDS = ("channel", "filter", "head")
_DECADES = 2.0  # the continuation starts at strength * 10^-2


@dataclasses.dataclass(frozen=True)
class WgsefConfig:
    """Options for `wgsef`.

    Attributes:
        groups: which dependency-graph groups are regularized, ':'-separated: channel (width-1 units:
            conv channels, FFN units) | filter (width-1 units made by convolutions only) | head
            (attention heads).
        keep: fraction of the units of each group left non-zero, k = max(1, round(keep n)), in (0, 1].
        strength: final lambda of the envelope prox (after the continuation), > 0.
        ramp: fraction of the training steps over which lambda rises geometrically from strength/100
            to strength, in (0, 1].
        project: fraction of the training steps after which the exact top-k projection replaces the
            envelope prox (its support is then held); 1 = only after the last step, in [0, 1].
        layers: glob patterns on the groups' layer names, ':'-separated; empty = every group.
        round_to: round k up so kept channels are a multiple of this where possible (8 suits
            onnxruntime's CPU conv kernels); 1 = no rounding, >= 1.
    """

    groups: tuple[str, ...] = ("channel", "head")
    keep: float = 0.5
    strength: float = 0.1
    ramp: float = 0.5
    project: float = 0.5
    layers: tuple[str, ...] = ()
    round_to: int = 1

    def __post_init__(self):
        for g in self.groups:
            if g not in GROUP_KINDS:
                raise ConfigError(f"wgsef.groups must be ':'-separated names from {list(GROUP_KINDS)}, "
                                  f"got {g!r}")
        if not self.groups:
            raise ConfigError(f"wgsef.groups must name at least one of {list(GROUP_KINDS)}")
        check_range("wgsef", "keep", self.keep, 0.0, 1.0, lo_open=True)
        check_range("wgsef", "strength", self.strength, 0.0, float("inf"), lo_open=True)
        check_range("wgsef", "ramp", self.ramp, 0.0, 1.0, lo_open=True)
        check_range("wgsef", "project", self.project, 0.0, 1.0)
        check_range("wgsef", "round_to", self.round_to, 1, float("inf"))


class UnitGroup:
    """The out-slot parameter slices of one dependency-graph group, seen as n unit vectors theta_j."""

    def __init__(self, model: Model, group: Group, k: int):
        self.group, self.k = group, k
        seen, self.slots = set(), []
        for slot, idx in group.members:
            t = model.get_tensor(slot.target)
            if slot.role != "out" or not isinstance(t, torch.nn.Parameter) or (slot.target, slot.dim) in seen:
                continue
            seen.add((slot.target, slot.dim))
            self.slots.append((slot.target, slot.dim, idx))
        self.mask: torch.Tensor | None = None  # the held top-k support (projection phase)
        self.alive_at_projection = -1  # non-zero units when the support was chosen

    def norms(self, model: Model) -> torch.Tensor:
        sq = torch.zeros(len(self.group.units), dtype=torch.float64)
        for target, dim, idx in self.slots:
            p = model.get_tensor(target).detach()
            per = p.double().pow(2).sum([d for d in range(p.dim()) if d != dim]) if p.dim() > 1 else \
                p.double().pow(2)
            keep = idx >= 0
            sq.index_add_(0, idx[keep], per[keep])
        return sq.sqrt()

    def scale(self, model: Model, factor: torch.Tensor) -> None:
        """theta_j <- factor_j theta_j (in place)."""
        for target, dim, idx in self.slots:
            p = model.get_tensor(target)
            f = torch.where(idx >= 0, factor[idx.clamp_min(0)], torch.ones(len(idx), dtype=factor.dtype))
            shape = [1] * p.dim()
            shape[dim] = -1
            p.data.mul_(f.to(p.dtype).reshape(shape))

    def prox(self, model: Model, c: float) -> None:
        """theta <- prox_{c S_k}(theta) on the unit norms."""
        norms = self.norms(model)
        self.scale(model, rm.sef_shrink(norms, torch.ones_like(norms), c, self.k))

    def project(self, model: Model) -> None:
        """theta <- P_k(theta); the first call chooses the support (top-k norms), later calls hold it."""
        if self.mask is None:
            norms = self.norms(model)
            self.alive_at_projection = int((norms > 0).sum())
            order = torch.argsort(norms, descending=True, stable=True)
            self.mask = torch.zeros(len(self.group.units), dtype=torch.float64)
            self.mask[order[: self.k]] = 1.0
        self.scale(model, self.mask)

    def alive(self, model: Model) -> int:
        return int((self.norms(model) > 0).sum())


class _Schedule:
    """lambda continuation, prox / projection switch; checkpointed (the held supports)."""

    def __init__(self, groups: list[UnitGroup], cfg: WgsefConfig, total: int):
        self.groups, self.cfg, self.total = groups, cfg, total
        self.last_lambda = 0.0

    def lam(self, t: int) -> float:
        frac = min(1.0, t / max(1.0, self.cfg.ramp * self.total))
        return self.cfg.strength * 10.0 ** (-_DECADES * (1.0 - frac))

    def __call__(self, model: Model, st: Step) -> None:
        if st.index >= self.cfg.project * self.total:
            for g in self.groups:
                g.project(model)
            return
        self.last_lambda = self.lam(st.index)
        for g in self.groups:
            g.prox(model, st.lr * self.last_lambda)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): g.mask for i, g in enumerate(self.groups) if g.mask is not None}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for i, g in enumerate(self.groups):
            g.mask = d.get(str(i))


def _selected(model: Model, g: Group, cfg: WgsefConfig) -> bool:
    if cfg.layers and not any(fnmatch.fnmatchcase(lay, pat) for lay in g.layers for pat in cfg.layers):
        return False
    if g.kind == "head":
        return "head" in cfg.groups
    if "channel" in cfg.groups:
        return True
    weights = [model.get_tensor(s.target) for s, _ in g.members if s.role == "out"]
    return "filter" in cfg.groups and all(w.dim() != 2 for w in weights if w.dim() > 1)


def target_units(n: int, width: int, keep: float, round_to: int) -> int:
    """k = max(1, round(keep n)), rounded up so k x width is a multiple of ``round_to`` where possible."""
    return round_units(max(1, round(keep * n)), n, width, round_to)


@register_pass("wgsef", WgsefConfig, phase=Phase.REGULARIZE, exact=False)
def wgsef(model: Model, config: WgsefConfig, ctx: PassContext) -> PassResult:
    """Train with the group sparse envelope prox to exactly k units per dependency-graph group."""
    spec = spec_for(ctx, "wgsef", optimizer="sgd", lr=0.01)
    dg = build_depgraph(model)
    groups = [UnitGroup(model, g, target_units(len(g.units), g.unit_width, config.keep, config.round_to))
              for g in dg.groups if _selected(model, g, config)]
    if not groups:
        raise ConfigError(f"wgsef: no prunable group matches groups={':'.join(config.groups)} "
                          f"layers={':'.join(config.layers) or '(all)'}; 'regc inspect' lists the layers")
    alive_before = [g.alive(model) for g in groups]
    schedule = _Schedule(groups, config, planned_steps(model, spec, "wgsef"))
    plan = TrainPlan()
    plan.add_after_step("wgsef", schedule)
    plan.add_state("wgsef", schedule)
    summary = fit(model, spec, plan)
    with torch.no_grad():  # the lambda -> inf limit at the end, even when the run stopped early
        for g in groups:
            g.project(model)
    report = [{"name": g.group.name, "kind": g.group.kind, "units": len(g.group.units), "k": g.k,
               "alive_before": a, "alive_at_projection": g.alive_at_projection, "alive_after": g.alive(model)}
              for g, a in zip(groups, alive_before, strict=True)]
    return PassResult(model, True, {
        "groups": report, "exact_k": all(r["alive_after"] == r["k"] for r in report),
        "lambda_last": schedule.last_lambda, "steps": summary["steps"], "loss_last": summary["loss_last"],
        "barriers": list(dg.warnings), "next": "add 'harden' to remove the zero units physically",
    })
