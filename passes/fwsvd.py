"""svd, fwsvd (alias lowrank): replace a weighted layer by two thin ones, W ~ A B of rank r.

FWSVD: Hsu et al., "Language model compression with weighted low-rank factorization", ICLR 2022.
In the paper's convention y = x W + b, W (N inputs x M outputs). From the diagonal Fisher F of W on
calibration data (``_fisher``), row importance f_i = sum_j F_ij and I = diag(sqrt(f / max f + eps)):

    svd(I W) = U S V^T,    A = I^-1 U_r S_r  (N x r),    B = V_r^T  (r x M)

minimizes sum_i f_i ||W_i - (A B)_i||^2 (approximately the loss increase); `svd` is the same with
I = 1 (Eckart-Young). linear / addmm / mm / matmul become two ops of the same family, (x A) B + b,
with the bias on the second. A conv weight (O, C, k...) is read as W = w.reshape(O, C k...)^T and
becomes a k x k conv with r outputs (weight A^T) followed by a 1 x 1 conv (weight B^T, bias).
r (N + M) weights replace N M, so only r < N M / (N + M) saves; other layers stay and are reported.
Ranks are fixed per layer (``ranks=``) or spent from the budget ``ratio`` (``_lowrank.allocate_*``).

Stats: ``layers`` maps each selected layer's weight user name to {op, shape, rank (None = dense),
full_rank, params_before, params_after (weights only; the bias is kept), energy_kept (of the
weighted spectrum), skipped (reason or None)}; grouped/transposed convs and shared weights are listed
with their reason and left out of ``params_before``/``params_after``/``ratio_achieved``;
``unsupported`` counts linear/conv-class ops without a parameter weight, ``excluded`` the layers that
``layers``/``skip`` left out; fwsvd adds ``fisher`` (loss, estimator, gradients averaged).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from regc.errors import ConfigError
from regc.ir import Model
from regc.opclass import OpClass, conv_view, linear_view, op_class
from regc.passes._fisher import diag_fisher
from regc.passes._lowrank import Spectrum, allocate_global, allocate_uniform, max_rank, weighted_svd
from regc.registry import PassContext, PassResult, Phase, check_choice, check_range, register_pass

__all__ = ["SvdConfig", "FwsvdConfig", "svd", "fwsvd"]

aten = torch.ops.aten
_FIRST_OP = {  # op of the layer -> op of its first (x A) factor
    aten.linear.default: aten.linear.default,
    aten.addmm.default: aten.mm.default,
    aten.mm.default: aten.mm.default,
    aten.matmul.default: aten.matmul.default,
}


@dataclasses.dataclass(frozen=True)
class SvdConfig:
    """Options for `svd` (truncated SVD of each selected layer's weight).

    Attributes:
        ratio: kept fraction of the weights of the factorizable selected layers with no fixed rank, in (0, 1].
        alloc: rank allocation: global (greedy, least error per weight over all layers) or uniform
            (ratio in every layer).
        round_to: ranks are multiples of this (8 or 16 suit CPU/GPU kernels), in [1, 4096].
        ranks: fixed ranks as PATTERN:RANK pairs, e.g. fc1.weight:8:*.conv*:16; these layers leave the budget.
        layers: glob patterns (':'-separated) on weight user names of the layers to factorize.
        skip: glob patterns (':'-separated) of layers to leave dense.
    """

    pass_name: ClassVar[str] = "svd"
    ratio: float = 0.5
    alloc: Literal["global", "uniform"] = "global"
    round_to: int = 1
    ranks: tuple[str, ...] = ()
    layers: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_range(self.pass_name, "ratio", self.ratio, 0.0, 1.0, lo_open=True)
        check_choice(self.pass_name, "alloc", self.alloc, ("global", "uniform"))
        check_range(self.pass_name, "round_to", self.round_to, 1, 4096)
        if not self.layers:
            raise ConfigError(f"{self.pass_name}.layers must name at least one pattern, got ()")
        self.fixed_ranks()

    def fixed_ranks(self) -> list[tuple[str, int]]:
        """``ranks`` as (pattern, rank) pairs; items may be 'pat:r' strings or alternating pat, r."""
        items = ":".join(str(i) for i in self.ranks).split(":") if self.ranks else []
        if len(items) % 2:
            raise ConfigError(f"{self.pass_name}.ranks must be PATTERN:RANK pairs, got {':'.join(items)!r}")
        pairs = []
        for pat, r in zip(items[::2], items[1::2], strict=True):
            if not r.isdigit() or int(r) < 1:
                raise ConfigError(
                    f"{self.pass_name}.ranks: rank for '{pat}' must be an integer >= 1, got {r!r}")
            pairs.append((pat, int(r)))
        return pairs


@dataclasses.dataclass(frozen=True)
class FwsvdConfig(SvdConfig):
    """Options for `fwsvd` (Fisher-weighted SVD; needs calibration data).

    Attributes:
        ratio: kept fraction of the weights of the factorizable selected layers with no fixed rank, in (0, 1].
        alloc: rank allocation: global (greedy, least Fisher-weighted error per weight) or uniform
            (ratio in every layer).
        round_to: ranks are multiples of this (8 or 16 suit CPU/GPU kernels), in [1, 4096].
        ranks: fixed ranks as PATTERN:RANK pairs, e.g. fc1.weight:8:*.conv*:16; these layers leave the budget.
        layers: glob patterns (':'-separated) on weight user names of the layers to factorize.
        skip: glob patterns (':'-separated) of layers to leave dense.
        loss: Fisher loss: auto (labels if the data has them, else distill), labels (paper: cross-entropy
            or MSE to the labels), distill (MSE to the original outputs), distill_kl (KL to the original
            softmax).
        fisher: sample (squared per-sample gradients, the paper) or batch (squared per-batch gradients,
            about 4x faster).
        batch_size: calibration batch size when the model's batch axis is dynamic, in [1, 65536].
        samples: calibration samples to use, 0 = all, in [0, 10^9].
        eps: added to the row importance (divided by its max) before the square root, in (0, 1].
    """

    pass_name: ClassVar[str] = "fwsvd"
    loss: Literal["auto", "labels", "distill", "distill_kl"] = "auto"
    fisher: Literal["sample", "batch"] = "sample"
    batch_size: int = 16
    samples: int = 0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.pass_name, "loss", self.loss, ("auto", "labels", "distill", "distill_kl"))
        check_choice(self.pass_name, "fisher", self.fisher, ("sample", "batch"))
        check_range(self.pass_name, "batch_size", self.batch_size, 1, 65536)
        check_range(self.pass_name, "samples", self.samples, 0, 10**9)
        check_range(self.pass_name, "eps", self.eps, 0.0, 1.0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str  # user name of the weight
    node: fx.Node
    weight: str  # attribute target
    layout: str  # "in_out": stored as W (N, M); "out_in": stored as (M, N) or (O, C, k...)
    shape: tuple[int, ...]

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the weight or its Fisher) in the paper's (N inputs, M outputs) orientation."""
        return t if self.layout == "in_out" else t.reshape(t.shape[0], -1).T


@register_pass("svd", SvdConfig, phase=Phase.LOWRANK, exact=False)
def svd(model: Model, config: SvdConfig, ctx: PassContext) -> PassResult:
    """Truncated SVD of each selected linear/conv weight, W ~ (U_r S_r) V_r^T, as two thin layers."""
    layers, stats = _find_layers(model, config)
    return _factorize(model, config, layers, None, stats)


@register_pass("fwsvd", FwsvdConfig, phase=Phase.LOWRANK, exact=False, aliases=("lowrank",),
               needs_data=True)
def fwsvd(model: Model, config: FwsvdConfig, ctx: PassContext) -> PassResult:
    """Fisher-weighted SVD (Hsu et al. 2022): svd(I W) with I = diag(sqrt(row Fisher)), as two thin layers."""
    data = ctx.require_data("fwsvd")
    layers, stats = _find_layers(model, config)
    loss = config.loss if config.loss != "auto" else ("labels" if data.labels is not None else "distill")
    fisher, info = ({}, {}) if not layers else diag_fisher(
        model, [lay.weight for lay in layers], data, loss=loss, mode=config.fisher,
        batch_size=config.batch_size, max_samples=config.samples, seed=ctx.seed, who="fwsvd")
    importance = {lay.name: lay.matrix(fisher[lay.weight]).sum(1) for lay in layers}
    stats["fisher"] = {"loss": loss, "mode": config.fisher, **info,
                       "zero_layers": sorted(n for n, f in importance.items() if float(f.max()) == 0.0)}
    return _factorize(model, config, layers, importance, stats, eps=config.eps)


def _find_layers(model: Model, config: SvdConfig) -> tuple[list[_Layer], dict[str, Any]]:
    """Selected factorizable layers, and stats holding the selected ones that cannot be factorized."""
    gm = model.gm
    reads: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            reads.setdefault(n.target, []).append(n)
    layers: list[_Layer] = []
    skipped: dict[str, dict[str, Any]] = {}
    unsupported: dict[str, int] = {}
    excluded = 0
    for node in list(gm.graph.nodes):
        lv, cv = linear_view(node, gm), conv_view(node, gm)
        if lv is None and cv is None:
            if op_class(node) in (OpClass.LINEAR, OpClass.CONV):
                unsupported[str(node.target)] = unsupported.get(str(node.target), 0) + 1
            continue
        weight = lv.weight if lv is not None else cv.weight
        name = model.user_name(weight)
        if not _matches(name, config.layers) or _matches(name, config.skip):
            excluded += 1
            continue
        shape = tuple(model.get_tensor(weight).shape)
        groups = _conv_kwargs(node, gm).get("groups", 1) if cv is not None else 1
        reason = None
        if len(reads[weight]) != 1 or len(reads[weight][0].users) != 1:
            reason = "shared weight (read by more than one op)"
        elif cv is not None and cv.transposed:
            reason = "transposed conv"
        elif groups != 1:
            reason = f"grouped conv (groups={groups})"
        if reason:
            skipped[name] = _entry(node, shape, None, None, reason)
            continue
        layout = lv.layout if lv is not None else "out_in"
        layers.append(_Layer(name, node, weight, layout, shape))
    return layers, {"layers": skipped, "unsupported": unsupported, "excluded": excluded}


def _factorize(model: Model, config: SvdConfig, layers: list[_Layer],
               importance: dict[str, torch.Tensor] | None, stats: dict[str, Any], eps: float = 1e-5
               ) -> PassResult:
    spectra: dict[str, Spectrum] = {
        lay.name: weighted_svd(lay.matrix(model.get_tensor(lay.weight)),
                               importance[lay.name] if importance is not None else None, eps)
        for lay in layers
    }
    ranks, reasons = _allocate(config, spectra)
    done = 0
    for lay in layers:
        sp, r = spectra[lay.name], ranks[lay.name]
        if r is None:
            stats["layers"][lay.name] = _entry(lay.node, lay.shape, None, None, reasons[lay.name])
            continue
        _replace(model, lay, *sp.factors(r), r)
        stats["layers"][lay.name] = _entry(lay.node, lay.shape, r, sp, None)
        done += 1
    if done:
        model.recompile()
    budgeted = [stats["layers"][lay.name] for lay in layers]  # not the ones no rank can apply to
    before = sum(e["params_before"] for e in budgeted)
    after = sum(e["params_after"] for e in budgeted)
    stats.update({
        "method": config.pass_name, "ratio": config.ratio, "alloc": config.alloc, "round_to": config.round_to,
        "factorized": done, "skipped": sum(e["skipped"] is not None for e in stats["layers"].values()),
        "params_before": before, "params_after": after, "ratio_achieved": after / before if before else 1.0,
    })
    return PassResult(model, done > 0, stats)


def _allocate(config: SvdConfig, spectra: dict[str, Spectrum]
              ) -> tuple[dict[str, int | None], dict[str, str]]:
    """Rank per layer (None = stay dense) and the reason for each None."""
    ranks: dict[str, int | None] = {}
    reasons: dict[str, str] = {}
    fixed = config.fixed_ranks()
    for name, sp in spectra.items():
        r = next((r for pat, r in fixed if fnmatch.fnmatchcase(name, pat)), None)
        if r is None:
            continue
        top = max_rank(sp.n_in, sp.n_out)
        ranks[name] = r if r <= top else None
        reasons[name] = f"fixed rank {r} saves no parameters (largest that does: {top})"
    free = {n: sp for n, sp in spectra.items() if n not in ranks}
    if config.alloc == "uniform":
        ranks.update(allocate_uniform({n: (sp.n_in, sp.n_out) for n, sp in free.items()}, config.ratio,
                                      config.round_to))
    else:
        budget = config.ratio * sum(sp.n_in * sp.n_out for sp in free.values())
        ranks.update(allocate_global(free, budget, config.round_to))
    for name, sp in free.items():
        if max_rank(sp.n_in, sp.n_out, config.round_to) < config.round_to:
            reasons[name] = (f"no rank that is a multiple of {config.round_to} saves parameters "
                             f"(needs r < N M / (N + M) with N={sp.n_in}, M={sp.n_out})")
        else:
            reasons[name] = f"the {config.alloc} allocation kept it dense (ratio={config.ratio})"
    return ranks, reasons


def _replace(model: Model, lay: _Layer, a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    """Rewrite ``lay.node`` as first(x, A) followed by the original op on (h, B), bias unchanged."""
    gm, node = model.gm, lay.node
    dtype = model.get_tensor(lay.weight).dtype
    if lay.layout == "in_out":
        first_w, second_w = a, b
    else:  # (M, N...) storage: first (r, C, k...), second (O, r, 1...)
        first_w = a.T.reshape(r, *lay.shape[1:])
        second_w = b.T.reshape(lay.shape[0], r, *[1] * (len(lay.shape) - 2))
    user = lay.name
    targets = []
    for tag, value in (("a", first_w), ("b", second_w)):
        t = model.free_target(f"{lay.weight}_lowrank_{tag}")
        model.set_tensor(t, value.to(dtype).contiguous())
        model.param_names[t] = f"{user}_lowrank_{tag}"
        model.annotations[t] = {"rank": r, "lowrank_of": user, "factor": tag}
        targets.append(t)
    model.annotations.pop(lay.weight, None)
    w_node = next(a for a in node.args
                  if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == lay.weight)
    with gm.graph.inserting_before(node):
        ga, gb = gm.graph.get_attr(targets[0]), gm.graph.get_attr(targets[1])
        if node.target in _FIRST_OP:
            x = linear_view(node, gm).input
            h = gm.graph.call_function(_FIRST_OP[node.target], (x, ga))
            node.args = tuple(h if v is x else gb if v is w_node else v for v in node.args)
        else:
            kw = _conv_kwargs(node, gm)
            h = gm.graph.call_function(node.target, _positional(node, {**kw, "weight": ga, "bias": None}))
            d = len(lay.shape) - 2
            second = {**kw, "input": h, "weight": gb, "stride": [1] * d, "padding": [0] * d,
                      "dilation": [1] * d}
            if "output_padding" in kw:
                second["output_padding"] = [0] * d
            node.args, node.kwargs = _positional(node, second), {}


def _conv_kwargs(node: fx.Node, gm: fx.GraphModule) -> dict[str, Any]:
    """All of a conv node's arguments by schema name, defaults filled in."""
    return dict(node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs)


def _positional(node: fx.Node, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(kwargs[a.name] for a in node.target._schema.arguments)


def _entry(node: fx.Node, shape: tuple[int, ...], r: int | None, sp: Spectrum | None,
           reason: str | None) -> dict[str, Any]:
    """The per-layer stats record (JSON-serializable); params count the weight only (bias is kept)."""
    rows, cols = shape[0], math.prod(shape[1:])
    dense = rows * cols
    return {
        "op": str(node.target), "shape": list(shape), "rank": r, "full_rank": min(rows, cols),
        "params_before": dense, "params_after": dense if r is None else r * (rows + cols),
        "energy_kept": None if sp is None else round(sp.energy_kept(r), 6), "skipped": reason,
    }


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
