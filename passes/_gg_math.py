"""Generalized-Gaussian (GG) math shared by ``gg_fit``, ``gg_init``, ``deepshape`` and
``regularize{kind=backslash}`` (Wu et al., BackSlash, ICML 2025; Wu et al., GG priors, arXiv 2506.00486 v3).

    density   p(x) = nu / (2 alpha Gamma(1/nu)) exp(-(|x - mu| / alpha)^nu)    (nu=2 Gaussian, nu=1 Laplace)
    variance  alpha^2 Gamma(3/nu) / Gamma(1/nu)
    shape     rho(nu) = Gamma(1/nu) Gamma(3/nu) / Gamma(2/nu)^2 = E[x^2] / E[|x|]^2 ;  nu_hat = the table
              entry (nu in [0.1, 3.0], step 0.01) nearest to the sample ratio; alpha_hat = sigma_hat
              sqrt(Gamma(1/nu) / Gamma(3/nu))   (moment-ratio estimator of the reference code)
    BackSlash w <- w - (rdo nu / n) sign(w) (|w| + clip)^(nu - 1) = w - (rdo / n) grad_w sum (|w| + clip)^nu
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["NU_TABLE", "rho", "estimate", "sample", "gg_pdf", "rate", "backslash_step", "histogram_reshape"]

NU_TABLE = np.round(np.arange(0.1, 3.0 + 1e-9, 0.01), 2)


def rho(nu: float | np.ndarray) -> np.ndarray:
    nu = np.asarray(nu, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    return np.exp(lg(1 / nu) + lg(3 / nu) - 2 * lg(2 / nu))


_RHO = rho(NU_TABLE)


def estimate(x: torch.Tensor, center: bool = False) -> dict[str, float]:
    """Moment-ratio GG fit of the values of ``x``: {"nu", "alpha", "mu", "rho"} (mu = 0 unless center)."""
    v = x.detach().reshape(-1).double()
    mu = float(v.mean()) if center else 0.0
    v = v - mu
    m2, m1 = float((v * v).mean()), float(v.abs().mean())
    if m1 == 0:
        return {"nu": float("nan"), "alpha": 0.0, "mu": mu, "rho": float("nan")}
    r = m2 / (m1 * m1)
    nu = float(NU_TABLE[np.argmin(np.abs(_RHO - r))])
    alpha = math.sqrt(m2) * math.exp(0.5 * (math.lgamma(1 / nu) - math.lgamma(3 / nu)))
    return {"nu": nu, "alpha": alpha, "mu": mu, "rho": r}


def sample(shape: tuple[int, ...], nu: float, alpha: float, rng: np.random.Generator) -> torch.Tensor:
    """GG(nu, 0, alpha) samples: alpha * sign * G^(1/nu), G ~ Gamma(1/nu, 1)."""
    g = rng.gamma(1.0 / nu, 1.0, size=shape)
    s = rng.choice([-1.0, 1.0], size=shape)
    return torch.from_numpy(alpha * s * g ** (1.0 / nu))


def gg_pdf(x: np.ndarray, nu: float, alpha: float, mu: float = 0.0) -> np.ndarray:
    return nu / (2 * alpha * math.gamma(1 / nu)) * np.exp(-((np.abs(x - mu) / alpha) ** nu))


def rate(w: torch.Tensor, nu: float, clip: float) -> torch.Tensor:
    """The GG code-length proxy sum (|w| + clip)^nu whose gradient step is the BackSlash update."""
    return ((w.abs() + clip) ** nu).sum()


def backslash_step(params: list[torch.Tensor], rdo: float, clip: float, nu: float | None = None) -> float:
    """One BackSlash step in place on ``params`` with one GG shape over all of them; returns nu."""
    if nu is None:
        nu = estimate(torch.cat([p.detach().reshape(-1) for p in params]))["nu"]
    n = sum(p.numel() for p in params)
    with torch.no_grad():
        for p in params:
            p.sub_((rdo * nu / n) * p.sign() * (p.abs() + clip) ** (nu - 1))
    return nu


def histogram_reshape(x: torch.Tensor, shape_scale: float, std_scale: float, grid_bits: int, min_count: int,
                      fit_core: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """DeepShape: reassign the dense core of ``x`` to grid values whose counts follow a target GG.

    Values are put on the grid 2^-grid_bits; the core is |q| <= q_max, q_max = the smallest positive
    grid value holding at most ``min_count`` values. (mu, nu, alpha) are fitted to all values (or to the
    core only, ``fit_core``, the reference's option); the core's sorted values are given, rank-preserving,
    to the grid values in order with counts round(N p_j), p_j the pmf of GG(mu, shape_scale nu,
    std_scale alpha) on the core's grid (largest-remainder rounding, so the counts sum to N; the
    reference floors and leaves the leftovers at their grid value, which breaks the ranking); values
    outside the core keep their exact value.
    """
    step = 2.0 ** -grid_bits
    flat = x.detach().reshape(-1).double()
    q = torch.round(flat / step)
    vals, counts = torch.unique(q, return_counts=True)
    sparse = vals[(vals > 0) & (counts <= min_count)]
    q_max = float(sparse.min()) if sparse.numel() else float(q.abs().max())
    core = q.abs() <= q_max
    fit = estimate(q[core] * step if fit_core else flat, center=True)
    target_nu, target_alpha = shape_scale * fit["nu"], std_scale * fit["alpha"]
    grid = np.arange(-q_max, q_max + 1)
    p = gg_pdf(grid * step, target_nu, target_alpha, fit["mu"])
    p = p / p.sum()
    n_core = int(core.sum())
    exact = p * n_core
    cnt = np.floor(exact).astype(np.int64)
    cnt[np.argsort(cnt - exact, kind="stable")[: n_core - int(cnt.sum())]] += 1  # largest remainders
    core_idx = torch.nonzero(core).reshape(-1)
    order = core_idx[torch.argsort(flat[core_idx], stable=True)]
    new = flat.clone()
    new[order] = torch.from_numpy(np.repeat(grid, cnt)).double() * step
    info = {"q_max": q_max * step, "core_fraction": n_core / flat.numel(), "nu_before": fit["nu"],
            "alpha_before": fit["alpha"], "nu_target": target_nu, "alpha_target": target_alpha}
    return new.reshape(x.shape).to(x.dtype), info
