"""The math of the ``regularize`` kinds as plain functions on tensors (each unit-tested against a
direct implementation of its reference formula). ``dim`` is the weight axis that indexes groups.

    l1            R = sum |w|;                         prox_t(w) = sign(w) max(|w| - t, 0)
    group lasso   R = sum_g sqrt(|g|) ||w_g||_2;        prox_t(w_g) = w_g max(0, 1 - t sqrt(|g|) / ||w_g||)
    SEF / WGSEF   S_k(x) = 1/2 min_{u in D_k} sum x_i^2 / u_i,  D_k = {0 <= u <= 1, sum e_i u_i <= k}
                  on group norms x_j = ||w_{G_j}|| (Beck & Refael's sparse envelope; Refael et al. 2024);
                  prox_{t S_k}(w)_{G_j} = w_{G_j} u_j / (u_j + c_j),  u_j = clip(eta a_j - c_j, 0, 1),
                  sum_j e_j u_j = k, solved by ``sef_root`` in O(n) (quickselect on the breakpoints).
    WDR (EQ-Net)  mean_l ( Skew[w_l]^2 + kurt_weight (Kurt[w_l] - K_T)^2 ), standardized with unbiased std
    SAF           tau^2 KL( softmax(z_past / tau) || softmax(z / tau) ), batch mean
    PS-KD         -sum_c ((1 - a_t) onehot(y) + a_t p_prev)_c log softmax(z)_c, batch mean
    StableMax     -log( s(z_y) / sum_j s(z_j) ),  s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), in float64
    perpGrad      g_perp = g - (<w, g> / <w, w>) w   (optionally rescaled to ||g||)
    SGD-SaI gSNR  ||g|| / (std(g) + eps), std unbiased, NaN (one element) -> 0
    nested drop   p(k) ∝ exp(-((k - 1) / width)^2), k = 1..D: keep feature dims 1..k
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "group_view", "l1", "prox_l1", "group_lasso", "prox_group_lasso", "sef_root", "sef_coefficients",
    "sef_value", "sef_shrink", "sef_prox", "skew_kurt", "wdr", "saf_kl", "pskd_loss", "stablemax_ce",
    "perp_grad", "gsnr",
    "nested_probs",
]


def group_view(w: torch.Tensor, dim: int) -> torch.Tensor:
    """``w`` as (groups, group_size): one row per index of axis ``dim``."""
    return w.transpose(0, dim).reshape(w.shape[dim], -1)


def l1(w: torch.Tensor) -> torch.Tensor:
    return w.abs().sum()


def prox_l1(w: torch.Tensor, t: float) -> torch.Tensor:
    return w.sign() * (w.abs() - t).clamp_min(0)


def group_lasso(w: torch.Tensor, dim: int) -> torch.Tensor:
    g = group_view(w, dim)
    return math.sqrt(g.shape[1]) * g.norm(dim=1).sum()


def prox_group_lasso(w: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    g = group_view(w, dim)
    norms = g.norm(dim=1, keepdim=True)
    scale = (1 - t * math.sqrt(g.shape[1]) / norms.clamp_min(1e-30)).clamp_min(0)
    return _ungroup(g * scale, w, dim)


def sef_root(a: np.ndarray, c: np.ndarray, e: np.ndarray, k: float) -> np.ndarray:
    """u_i = clip(eta a_i - c_i, 0, 1) with sum_i e_i u_i = k (u_i = 0 where a_i = 0); float64, O(n).

    g(eta) = sum_i e_i u_i(eta) - k is continuous, non-decreasing and piecewise linear: item i adds
    slope e_i a_i and offset -e_i c_i at the breakpoint c_i / a_i and takes them back (offset +e_i) at
    (c_i + 1) / a_i. Quickselect on the 2n breakpoint events: split at the median (``argpartition``,
    O(m)), evaluate g there from the events below it, keep the half that holds the root and fold the
    events below into running sums; m halves each round, so the total work is O(n). The last few
    events are sorted and swept.
    """
    a, c, e = (np.asarray(v, dtype=np.float64) for v in (a, c, e))
    u = np.zeros_like(a)
    idx = np.flatnonzero(a > 0)
    if e[idx].sum() <= k:
        u[idx] = 1.0
        return u
    A, C, E = a[idx], c[idx], e[idx]
    b = np.concatenate([C / A, (C + 1) / A])
    ds = np.concatenate([E * A, -E * A])
    do = np.concatenate([-E * C, E * (C + 1)])
    s0 = o0 = 0.0  # slope and offset of g from the events below the current segment
    while b.size > 64:
        m = b.size // 2
        order = np.argpartition(b, m)
        b, ds, do = b[order], ds[order], do[order]
        s_lo, o_lo = ds[: m + 1].sum(), do[: m + 1].sum()
        if o0 + o_lo + b[m] * (s0 + s_lo) < k:  # g(b[m]) < 0: the root is above b[m]
            s0, o0 = s0 + s_lo, o0 + o_lo
            b, ds, do = b[m + 1:], ds[m + 1:], do[m + 1:]
        else:
            b, ds, do = b[: m + 1], ds[: m + 1], do[: m + 1]
    order = np.argsort(b, kind="stable")
    b, slope, off = b[order], s0 + np.cumsum(ds[order]), o0 + np.cumsum(do[order])
    j = int(np.searchsorted(off + slope * b - k, 0.0))  # the first breakpoint where g >= 0
    s, o = (slope[j - 1], off[j - 1]) if j > 0 else (s0, o0)
    eta = (k - o) / s if s > 0 else b[min(j, b.size - 1)]
    u[idx] = np.clip(eta * A - C, 0, 1)
    return u


def sef_coefficients(sizes: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) of a weighting: the envelope of x_j = s_j ||w_G_j|| with budget sum_j e_j u_j <= k.
    none: s = 1, e = 1;  size: s = 1/sqrt(d_j), e = 1;  budget: s = 1, e = d_j  (d_j = group size)."""
    ones = torch.ones_like(sizes)
    if weighting == "none":
        return ones, ones
    return (sizes.rsqrt(), ones) if weighting == "size" else (ones, sizes)


def sef_value(norms: torch.Tensor, k: float, sizes: torch.Tensor | None = None, weighting: str = "none"
              ) -> torch.Tensor:
    """S = 1/2 sum_j x_j^2 / u_j at the optimal u = clip(eta x_j / sqrt(e_j), 0, 1); differentiable in
    ``norms`` with u held fixed (Danskin: the min over u has gradient x_j / u_j)."""
    sizes = torch.ones_like(norms) if sizes is None else sizes.to(norms)
    s, e = sef_coefficients(sizes.detach(), weighting)
    x = s * norms
    a = (x.detach() / e.sqrt()).double().numpy()
    u = torch.as_tensor(sef_root(a, np.zeros(len(a)), e.double().numpy(), k)).to(norms)
    live = u > 0
    return 0.5 * (x[live] ** 2 / u[live]).sum()


def sef_shrink(norms: torch.Tensor, sizes: torch.Tensor, t: float, k: float, weighting: str = "none"
               ) -> torch.Tensor:
    """Per-group factors of prox_{t S}: u_j / (u_j + c_j), c_j = t s_j^2,
    u_j = clip(eta s_j ||w_G_j|| / sqrt(e_j) - c_j, 0, 1) with sum_j e_j u_j = k."""
    norms, sizes = norms.detach().double(), sizes.double()
    s, e = sef_coefficients(sizes, weighting)
    c = t * s**2
    u = torch.as_tensor(sef_root((s * norms / e.sqrt()).numpy(), c.numpy(), e.numpy(), k))
    return torch.where(u > 0, u / (u + c), torch.zeros_like(u))


def sef_prox(w: torch.Tensor, dim: int, t: float, k: float, weighting: str = "none") -> torch.Tensor:
    """prox_{t S}(w) over the groups along ``dim`` (w_G_j scaled by ``sef_shrink``)."""
    g = group_view(w, dim)
    norms = g.norm(dim=1)
    scale = sef_shrink(norms, torch.full_like(norms, g.shape[1]), t, k, weighting)
    return _ungroup(g * scale.to(g).unsqueeze(1), w, dim)


def skew_kurt(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = (w - w.mean()) / w.std()
    return (z**3).mean(), (z**4).mean()


def wdr(weights: list[torch.Tensor], kurtosis_target: float = 1.8, kurt_weight: float = 0.015
        ) -> torch.Tensor:
    terms = []
    for w in weights:
        sk, ku = skew_kurt(w)
        terms.append(sk**2 + kurt_weight * (ku - kurtosis_target) ** 2)
    return torch.stack(terms).mean()


def saf_kl(logits: torch.Tensor, past: torch.Tensor, tau: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(past / tau, -1), log_target=True,
                    reduction="batchmean") * tau * tau


def pskd_loss(logits: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor, alpha: float) -> torch.Tensor:
    target = (1 - alpha) * F.one_hot(labels.long(), logits.shape[-1]).to(logits) + alpha * prev
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()


def stablemax_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    s = torch.where(z >= 0, z + 1, 1 / (1 - z.clamp_max(0)))
    logp = s.log() - s.sum(-1, keepdim=True).log()
    return -logp.gather(-1, labels.long().unsqueeze(-1)).mean().to(logits.dtype)


def perp_grad(w: torch.Tensor, g: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    ww = (w * w).sum()
    if ww == 0:
        return g
    out = g - ((w * g).sum() / ww) * w
    if rescale:
        n = out.norm()
        out = out * (g.norm() / n) if n > 0 else out
    return out


def gsnr(g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    std = g.std() if g.numel() > 1 else g.new_zeros(())  # the reference's nan_to_num(std of 1 value)
    return g.norm() / (std + eps)


def nested_probs(dims: int, width: float) -> torch.Tensor:
    k = torch.arange(dims, dtype=torch.float64)
    p = torch.exp(-((k / width) ** 2))
    return p / p.sum()


def _ungroup(g: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(like.transpose(0, dim).shape)
    return g.reshape(shape).transpose(0, dim).contiguous()
