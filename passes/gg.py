"""Generalized-Gaussian (GG) priors (Wu et al., arXiv 2506.00486 v3; BackSlash, ICML 2025); math in
``_gg_math``:

    gg_fit     fit p(w) ∝ exp(-(|w - mu| / alpha)^nu) per weight tensor and over all of them (moment-ratio
               table rho(nu) = Gamma(1/nu) Gamma(3/nu) / Gamma(2/nu)^2), with Kolmogorov-Smirnov distances
               of the GG, Gaussian and Laplace fits; analysis only
    gg_init    re-draw weights from GG(nu, 0, alpha), alpha = sqrt(gain / shape[0] Gamma(1/nu) / Gamma(3/nu)),
               so Var(w) = gain / shape[0] (the reference code's fan = shape[0])
    deepshape  reshape the dense core of all chosen weights, rank-preserving, to GG(mu, shape_scale nu,
               std_scale alpha) on a 2^-grid_bits grid (histogram specification), then optionally
               recover by distillation to the model as it was (regc.train)
Deviation from the reference gg_init: tensors with fewer than 2 dims (biases, norms) keep their values
(the reference sets every 'weight' to 1 and every 'bias' to 0, conv kernels included).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy import stats as sps

from regc.errors import ConfigError
from regc.ir import Model
from regc.passes import _gg_math as gg
from regc.passes._reg_layers import matching_params
from regc.registry import PassContext, PassResult, Phase, check_range, register_pass
from regc.train import fit, spec_for

_KS_SAMPLE = 100_000


def _weights(model: Model, layers: tuple[str, ...], pass_name: str) -> list[tuple[str, str]]:
    ps = [(u, t) for u, t in matching_params(model, layers) if model.get_tensor(t).dim() >= 2]
    if not ps:
        raise ConfigError(f"{pass_name}: no weight tensor (2 or more dims) matches "
                          f"layers={':'.join(layers) or '(all)'}")
    return ps


def ks_distances(x: torch.Tensor, fit_: dict[str, float], seed: int = 0) -> dict[str, float]:
    """KS statistic of the GG fit and of zero-mean Gaussian / Laplace fits (on <= 100k sampled values)."""
    v = x.detach().reshape(-1).double().numpy()
    if v.size > _KS_SAMPLE:
        v = v[np.random.default_rng(seed).integers(0, v.size, _KS_SAMPLE)]
    v = v - fit_["mu"]
    sigma, b = math.sqrt((v * v).mean()), np.abs(v).mean()
    return {"gg": float(sps.kstest(v, sps.gennorm(fit_["nu"], scale=fit_["alpha"]).cdf).statistic),
            "gaussian": float(sps.kstest(v, sps.norm(scale=sigma).cdf).statistic),
            "laplace": float(sps.kstest(v, sps.laplace(scale=b).cdf).statistic)}


@dataclasses.dataclass(frozen=True)
class GgFitConfig:
    """Options for `gg_fit`.

    Attributes:
        layers: glob patterns on parameter/layer user names, ':'-separated; empty = every tensor with
            2 or more dims.
        center: fit the mean mu too (else mu = 0, as BackSlash does).
    """

    layers: tuple[str, ...] = ()
    center: bool = False


@register_pass("gg_fit", GgFitConfig, phase=Phase.CANONICALIZE, exact=True)
def gg_fit(model: Model, config: GgFitConfig, ctx: PassContext) -> PassResult:
    """Fit GG shapes per weight tensor and globally (stats only; the model is unchanged)."""
    per = {}
    flat = []
    for user, target in _weights(model, config.layers, "gg_fit"):
        w = model.get_tensor(target).detach()
        f = gg.estimate(w, config.center)
        per[user] = {**f, "numel": w.numel(), "ks": ks_distances(w, f)}
        flat.append(w.reshape(-1))
    allw = torch.cat(flat)
    f = gg.estimate(allw, config.center)
    return PassResult(model, False, {"global": {**f, "numel": allw.numel(), "ks": ks_distances(allw, f)},
                                     "layers": per})


@dataclasses.dataclass(frozen=True)
class GgInitConfig:
    """Options for `gg_init`.

    Attributes:
        shape: GG shape nu of the initial weights, in [0.1, 3] (2 = Gaussian, 1 = Laplace).
        gain: xi in Var(w) = xi / shape[0]: 2 for ReLU, 1 for linear/sigmoid, 2/(1+k^2) for LeakyReLU(k); > 0.
        layers: glob patterns on parameter/layer user names, ':'-separated; empty = every tensor with
            2 or more dims.
        seed: random seed of the draw.
    """

    shape: float = 2.0
    gain: float = 2.0
    layers: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        check_range("gg_init", "shape", self.shape, 0.1, 3.0)
        check_range("gg_init", "gain", self.gain, 0.0, float("inf"), lo_open=True)


@register_pass("gg_init", GgInitConfig, phase=Phase.REPARAM, exact=False)
def gg_init(model: Model, config: GgInitConfig, ctx: PassContext) -> PassResult:
    """Re-initialize weight tensors from GG(shape, 0, alpha) with Var = gain / shape[0]."""
    rng = np.random.default_rng(config.seed)
    nu = config.shape
    per = {}
    for user, target in _weights(model, config.layers, "gg_init"):
        w = model.get_tensor(target)
        var = config.gain / w.shape[0]
        alpha = math.sqrt(var * math.exp(math.lgamma(1 / nu) - math.lgamma(3 / nu)))
        with torch.no_grad():
            w.copy_(gg.sample(tuple(w.shape), nu, alpha, rng).to(w.dtype))
        per[user] = {"alpha": alpha, "target_std": math.sqrt(var), "std": float(w.detach().std()),
                     "nu_fit": gg.estimate(w)["nu"]}
    return PassResult(model, True, {"shape": nu, "gain": config.gain, "layers": per})


@dataclasses.dataclass(frozen=True)
class DeepShapeConfig:
    """Options for `deepshape`.

    Attributes:
        shape_scale: target nu = shape_scale * fitted nu, in (0, 2].
        std_scale: target alpha = std_scale * fitted alpha, in (0, 2].
        grid_bits: weights are put on the grid 2^-grid_bits, in [4, 20].
        min_count: the core ends at the first positive grid value holding at most this many weights, >= 1.
        fit_core: fit the GG to the core values only (the reference's option; truncation biases nu up).
        layers: glob patterns on parameter/layer user names, ':'-separated; empty = every tensor with
            2 or more dims.
        recover: after reshaping, train towards the model's outputs before reshaping (needs data; without
            ctx.train: loss=distill with dropout/BatchNorm in eval mode).
    """

    shape_scale: float = 0.8
    std_scale: float = 0.6
    grid_bits: int = 13
    min_count: int = 1000
    fit_core: bool = False
    layers: tuple[str, ...] = ()
    recover: bool = False

    def __post_init__(self):
        check_range("deepshape", "shape_scale", self.shape_scale, 0.0, 2.0, lo_open=True)
        check_range("deepshape", "std_scale", self.std_scale, 0.0, 2.0, lo_open=True)
        check_range("deepshape", "grid_bits", self.grid_bits, 4, 20)
        check_range("deepshape", "min_count", self.min_count, 1, float("inf"))


@register_pass("deepshape", DeepShapeConfig, phase=Phase.REGULARIZE, exact=False)
def deepshape(model: Model, config: DeepShapeConfig, ctx: PassContext) -> PassResult:
    """Reshape the weight distribution towards a narrower GG (DeepShape), then optionally distill back."""
    params = _weights(model, config.layers, "deepshape")
    tensors = [model.get_tensor(t) for _, t in params]
    teacher = model.clone() if config.recover else None
    flat = torch.cat([w.detach().reshape(-1) for w in tensors])
    new, info = gg.histogram_reshape(flat, config.shape_scale, config.std_scale, config.grid_bits,
                                     config.min_count, config.fit_core)
    with torch.no_grad():
        at = 0
        for w in tensors:
            w.copy_(new[at:at + w.numel()].reshape(w.shape))
            at += w.numel()
    after = gg.estimate(new, center=True)
    stats = {**info, "nu_after": after["nu"], "alpha_after": after["alpha"], "tensors": len(params),
             "numel": flat.numel(), "changed_fraction": float((new != flat).double().mean())}
    if teacher is not None:
        summary = fit(model, spec_for(ctx, "deepshape", loss="distill", train_mode=False), teacher=teacher)
        rec = torch.cat([model.get_tensor(t).detach().reshape(-1) for _, t in params])
        stats["recovery"] = {k: v for k, v in summary.items() if k not in ("history", "spec")}
        stats["nu_after_recovery"] = gg.estimate(rec, center=True)["nu"]
    return PassResult(model, stats["changed_fraction"] > 0 or teacher is not None, stats)
