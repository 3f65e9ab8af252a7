"""regularize: train the model with one regularizer inserted into the shared driver (``regc.train``).

Kinds (formulas in ``regc.passes._reg_math``; sources in TECHNIQUES.md sections 4, 5, 6, 7):
    l1, group_lasso  lambda sum|w| / lambda sum_g sqrt(|g|) ||w_g||: a loss term, or a proximal step after SGD
    wgsef            sparse envelope S_k of the group norms (Refael et al., TMLR 2024; Beck & Refael), by
                     prox-SGD: w <- prox_{lr lambda S_k}(w) after each step, O(n); for large lambda only the
                     top-k groups stay alive
    backslash        GG-prior rate step w -= (rdo nu / n) sign(w)(|w| + clip)^(nu-1) after each step (Wu et
                     al., ICML 2025); nu re-fitted over all chosen parameters every step
    wdr              EQ-Net weight distribution regularizer mean_l(Skew^2 + kurt_weight (Kurt - K_T)^2)
    saf              SAF: lambda tau^2 KL(softmax(z_{e-lag}/tau) || softmax(z/tau)), z_{e-lag} = the sample's
                     own logits lag epochs earlier (Du et al., NeurIPS 2022)
    pskd             PS-KD: cross-entropy to (1 - a_t) onehot + a_t p_{t-1}, a_t = alpha (t+1)/epochs
    stablemax        StableMax cross-entropy replaces softmax cross-entropy (Prieto et al., ICLR 2025)
    perpgrad         perpGrad: g <- g - (<w,g>/<w,w>) w per parameter tensor, before the optimizer step
    sgd_sai          SGD-SaI: SGD with momentum, per-tensor lr scaled by the gradient SNR of the first step
                     (lr_p = lr gSNR_p as in the official sgd_sai.py; TECHNIQUES.md also divides by the max)
    nested_dropout   nested dropout on the classifier input: keep the first k features,
                     p(k) ∝ exp(-((k-1)/width)^2) (Chen et al., TNNLS 2022)
The inference graph keeps its structure; only weights change (nested_dropout with keep_dims=K zeroes the
classifier's inputs beyond K). The training spec is ``ctx.train``, or the defaults on ``ctx.data``.
"""

from __future__ import annotations

import dataclasses

from regc.errors import ConfigError
from regc.ir import Model
from regc.passes._reg_kinds import BUILDERS
from regc.passes._reg_layers import tensor_stats
from regc.registry import PassContext, PassResult, Phase, check_choice, check_range, register_pass
from regc.train import TrainPlan, fit, spec_for

KINDS = tuple(BUILDERS)

_USES: dict[str, set[str]] = {
    "l1": {"layers", "strength", "proximal"},
    "group_lasso": {"layers", "strength", "proximal", "groups"},
    "wgsef": {"layers", "strength", "proximal", "groups", "keep", "weighting"},
    "backslash": {"layers", "strength", "clip"},
    "wdr": {"layers", "strength", "kurtosis_target", "kurt_weight", "skip_first"},
    "saf": {"strength", "temperature", "start_epoch", "lag"},
    "pskd": {"alpha"},
    "stablemax": set(),
    "perpgrad": {"layers", "rescale"},
    "sgd_sai": {"layers"},
    "nested_dropout": {"layers", "width", "keep_dims"},
}
_STRENGTH = {"l1": 1e-4, "group_lasso": 1e-3, "wgsef": 1.0, "backslash": 2e3, "wdr": 1.0, "saf": 0.3}
_PROXIMAL = {"l1": False, "group_lasso": False, "wgsef": True}


@dataclasses.dataclass(frozen=True)
class RegularizeConfig:
    """Options for `regularize` (each kind reads only its own; setting another is an error).

    Attributes:
        kind: l1 | group_lasso | wgsef | backslash | wdr | saf | pskd | stablemax | perpgrad | sgd_sai |
            nested_dropout.
        layers: glob patterns on layer/parameter user names, ':'-separated; empty = all conv/linear layers
            (all parameters for backslash, perpgrad, sgd_sai).
        strength: lambda (backslash: rdo); none = the kind's default (l1 1e-4, group_lasso 1e-3, wgsef 1,
            backslash 2e3, wdr 1, saf 0.3).
        proximal: l1/group_lasso/wgsef as a proximal step after each optimizer step instead of a loss term;
            none = false (wgsef: true).
        groups: out | in: groups are output channels/neurons or input channels/features (group_lasso, wgsef).
        keep: wgsef: k as a fraction of the groups of each layer (weighting=budget: of its weights),
            in (0, 1].
        weighting: wgsef group weights: none | size (norms / sqrt(group size)) | budget (sum size_j u_j <= k).
        clip: backslash: offset in (|w| + clip)^(nu-1), > 0.
        kurtosis_target: wdr: target kurtosis K_T (1.8 = uniform).
        kurt_weight: wdr: weight of the kurtosis term against the skewness term, >= 0.
        skip_first: wdr: leave the first layer out (as EQ-Net does).
        temperature: saf: softmax temperature tau, > 0.
        start_epoch: saf: the term is active for epochs > start_epoch (0-based).
        lag: saf: compare with the logits recorded lag epochs earlier, >= 1.
        alpha: pskd: final weight alpha_T of the model's own past predictions, in [0, 1].
        rescale: perpgrad: rescale the orthogonal gradient to the norm of the original one.
        width: nested_dropout: eta of p(k) ∝ exp(-((k-1)/eta)^2), > 0.
        keep_dims: nested_dropout: input features the classifier keeps after training; 0 = all.
    """

    kind: str = "l1"
    layers: tuple[str, ...] = ()
    strength: float | None = None
    proximal: bool | None = None
    groups: str = "out"
    keep: float = 0.25
    weighting: str = "none"
    clip: float = 1.0
    kurtosis_target: float = 1.8
    kurt_weight: float = 0.015
    skip_first: bool = True
    temperature: float = 5.0
    start_epoch: int = 5
    lag: int = 2
    alpha: float = 0.8
    rescale: bool = False
    width: float = 10.0
    keep_dims: int = 0

    def __post_init__(self):
        check_choice("regularize", "kind", self.kind, KINDS)
        uses = _USES[self.kind]
        extra = [f.name for f in dataclasses.fields(self)
                 if f.name not in uses and f.name != "kind" and getattr(self, f.name) != f.default]
        if extra:
            raise ConfigError(f"regularize.{extra[0]} is not an option of kind={self.kind}; it reads: "
                              f"{', '.join(sorted(uses)) or '(no options)'}")
        check_range("regularize", "strength", self.lam, 0.0, float("inf"))
        check_choice("regularize", "groups", self.groups, ("out", "in"))
        check_choice("regularize", "weighting", self.weighting, ("none", "size", "budget"))
        check_range("regularize", "keep", self.keep, 0.0, 1.0, lo_open=True)
        check_range("regularize", "clip", self.clip, 0.0, float("inf"), lo_open=True)
        check_range("regularize", "kurt_weight", self.kurt_weight, 0.0, float("inf"))
        check_range("regularize", "temperature", self.temperature, 0.0, float("inf"), lo_open=True)
        check_range("regularize", "start_epoch", self.start_epoch, 0, float("inf"))
        check_range("regularize", "lag", self.lag, 1, float("inf"))
        check_range("regularize", "alpha", self.alpha, 0.0, 1.0)
        check_range("regularize", "width", self.width, 0.0, float("inf"), lo_open=True)
        check_range("regularize", "keep_dims", self.keep_dims, 0, float("inf"))

    @property
    def lam(self) -> float:
        """strength, or the kind's default."""
        return _STRENGTH.get(self.kind, 0.0) if self.strength is None else self.strength

    @property
    def prox(self) -> bool:
        """proximal, or the kind's default."""
        return _PROXIMAL.get(self.kind, False) if self.proximal is None else self.proximal


@register_pass("regularize", RegularizeConfig, phase=Phase.REGULARIZE, exact=False)
def regularize(model: Model, config: RegularizeConfig, ctx: PassContext) -> PassResult:
    """Train with one regularizer (kind=...) through regc.train; weights change, graph structure does not."""
    spec = spec_for(ctx, "regularize")
    plan = TrainPlan()
    targets = BUILDERS[config.kind](model, config, spec, plan)
    before = {u: _stats(model, t, d) for u, t, d in targets}
    summary = fit(model, spec, plan)
    layers = {u: {"before": before[u], "after": _stats(model, t, d)} for u, t, d in targets}
    train = {k: v for k, v in summary.items() if k not in ("history", "spec")}
    return PassResult(model, True, {"kind": config.kind, "strength": config.lam, "train": train,
                                    "layers": layers})


def _stats(model: Model, target: str, dim: int | None) -> dict[str, float]:
    return tensor_stats(model.get_tensor(target), dim)
