"""RF8, the 8-bit residual float (Wu et al., GG priors, arXiv 2506.00486 v3; TECHNIQUES.md 6.5).

A weight keeps the sum of its first two signed powers of two, rounded in the log domain:
    e1 = round(log2|w|),  r = |w| - 2^e1,  e2 = round(log2|r|),  delta = e1 - e2,
    |w_hat| = 2^e1 (1 + sign(r) 2^-delta)   if delta <= 4,   else 2^e1
so per binade the mantissa is one of M = {1, 1.5, 1.25, 0.75, 1.125, 0.875, 1.0625, 0.9375} (delta = 1
only with r > 0). Byte layout: ``sign(1) | e1 - bias (4) | residual code (3)`` with the residual code
indexing M; the per-tensor exponent ``bias`` puts 16 binades [bias, bias + 15] in range. Larger
exponents saturate to 1.5 * 2^(bias + 15), smaller ones flush to zero, and 0x80 (a "negative 1.0 *
2^bias") is reserved for zero. Decoding: (-1)^s M[code & 7] 2^(((code >> 3) & 15) + bias).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MANTISSAS", "ZERO_CODE", "encode", "decode", "value_set", "bias_for", "gg_top"]

MANTISSAS = (1.0, 1.5, 1.25, 0.75, 1.125, 0.875, 1.0625, 0.9375)
ZERO_CODE = 0x80
_BINADES = 16


def _residual_code(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """delta 1 -> 1 (+ only), 2 -> 2/3, 3 -> 4/5, 4 -> 6/7 (+/-); anything else -> 0 (no residual)."""
    code = torch.where(positive, 2 * delta - 2, 2 * delta - 1)
    code = torch.where(delta == 1, torch.ones_like(code), code)
    ok = (delta >= 1) & (delta <= 4) & ((delta > 1) | positive)
    return torch.where(ok, code, torch.zeros_like(code))


def encode(w: torch.Tensor, bias: int) -> torch.Tensor:
    """uint8 codes of ``w`` with exponent bias ``bias``."""
    w = w.detach().double()
    a = w.abs()
    nz = a > 0
    e1 = torch.where(nz, torch.round(torch.log2(torch.where(nz, a, torch.ones_like(a)))), torch.zeros_like(a))
    r = a - torch.exp2(e1)
    rnz = r != 0
    e2 = torch.where(rnz, torch.round(torch.log2(torch.where(rnz, r.abs(), torch.ones_like(r)))), e1 - 99)
    rcode = _residual_code((e1 - e2).long(), r > 0)
    top = bias + _BINADES - 1
    rcode = torch.where(e1 > top, torch.ones_like(rcode), rcode)  # saturate at 1.5 * 2^top
    efield = (e1.clamp(max=top) - bias).long()
    code = (w < 0).long() << 7 | efield.clamp(min=0) << 3 | rcode
    flush = ~nz | (efield < 0) | (code == ZERO_CODE)
    return torch.where(flush, torch.full_like(code, ZERO_CODE), code).to(torch.uint8)


def decode(codes: torch.Tensor, bias: int | float | torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 ``codes`` (the reference the ONNX function body mirrors).

    The mantissa is computed, not looked up, so the body is elementwise arithmetic only (a constant
    table would be a tensor created inside the op, which TVM's import of the op body cannot take):
        M[0] = 1,  M[r] = 1 - 2^-d if r odd and r > 1, else 1 + 2^-d,  d = floor((r + 2) / 2),
    equal to ``MANTISSAS[r]`` (powers of two and their sums are exact in float32).
    """
    c = codes.to(torch.int32)
    r = c & 7
    step = torch.pow(2.0, -((r + 2) // 2).float())
    mant = torch.where(((r & 1) == 1) & (r > 1), 1.0 - step, 1.0 + step)
    mant = torch.where(r == 0, torch.ones_like(mant), mant)
    mag = mant * torch.pow(2.0, ((c >> 3) & 15).float() + torch.as_tensor(bias, dtype=torch.float32))
    val = torch.where((c >> 7) == 1, -mag, mag)
    return torch.where(c == ZERO_CODE, torch.zeros_like(val), val)


def value_set(bias: int = 0) -> torch.Tensor:
    """All distinct values RF8 represents with exponent ``bias`` (zero included), sorted."""
    return torch.unique(decode(torch.arange(256, dtype=torch.uint8), bias))


def bias_for(w: torch.Tensor, top: float) -> int:
    """The bias whose top binade holds magnitude ``top``: round(log2 top) - 15."""
    return int(round(math.log2(top))) - (_BINADES - 1) if top > 0 else 0


def gg_top(w: torch.Tensor, fit: dict[str, float]) -> float:
    """The GG quantile exceeded with probability 1 / (20 n) (about once in 20 tensors of this size),
    capped at max|w|: the largest magnitude worth the top binade; rarer outliers saturate."""
    from scipy.stats import gennorm

    n = w.numel()
    q = float(gennorm.ppf(1 - 1 / (20 * n), fit["nu"], scale=fit["alpha"]))
    return min(q, float(w.abs().max())) if np.isfinite(q) else float(w.abs().max())
