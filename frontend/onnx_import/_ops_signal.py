"""Signal ops on the ONNX real representation of complex tensors ([..., 2] = real, imaginary).

DFT of length L along ``axis``: X_k = sum_j x_j exp(-2 pi i j k / L), computed as real matrix
products with cos/sin tables (C = cos, S = sin of 2 pi j k / L):
  Re X = C re + S im,  Im X = C im - S re;  the inverse uses exp(+...) and divides by L.
``onesided`` keeps the L // 2 + 1 non-redundant frequencies; its inverse rebuilds a real signal from
them (Hermitian symmetry).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._registry import OpCall, norm_axis, rule


def _fit(t: torch.Tensor, length: int) -> torch.Tensor:
    """Truncate or zero-pad the last axis to ``length``."""
    return t[..., :length] if t.shape[-1] >= length else F.pad(t, [0, length - t.shape[-1]])


def _tables(rows: int, cols: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    angle = (
        2
        * math.pi
        * torch.outer(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64))
        / length
    )
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


@rule("DFT", consts=(1, 2))
def dft(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    axis = norm_axis(n.attr("axis", 1) if n.opset < 20 else n.int(2, -2), x.dim())
    dtype, x = x.dtype, x.double()  # the tables and sums in float64: inverse round trips cancel exactly
    inverse, onesided = bool(n.attr("inverse", 0)), bool(n.attr("onesided", 0))
    re = torch.movedim(x[..., 0], axis, -1)
    im = torch.movedim(x[..., 1], axis, -1) if x.shape[-1] == 2 else torch.zeros_like(re)
    size = re.shape[-1]
    length = n.int(1) if n.has(1) else (2 * (size - 1) if inverse and onesided else size)
    if inverse and onesided:  # x_j = (Re X_0 + sum_k w_k (Re X_k cos - Im X_k sin)) / L, w = 2 but 1 at L/2
        half = length // 2 + 1
        cos, sin = _tables(length, half, length, x.dtype)
        w = torch.full((half,), 2.0, dtype=x.dtype)
        w[0] = 1.0
        if length % 2 == 0:
            w[-1] = 1.0
        out = ((_fit(re, half) * w) @ cos.t() - (_fit(im, half) * w) @ sin.t()) / length
        return torch.movedim(out, -1, axis).unsqueeze(-1).to(dtype)
    re, im = _fit(re, length), _fit(im, length)
    bins = length // 2 + 1 if onesided and not inverse else length
    cos, sin = _tables(bins, length, length, x.dtype)
    if inverse:
        out_re, out_im = (re @ cos.t() - im @ sin.t()) / length, (im @ cos.t() + re @ sin.t()) / length
    else:
        out_re, out_im = re @ cos.t() + im @ sin.t(), im @ cos.t() - re @ sin.t()
    return torch.stack((torch.movedim(out_re, -1, axis), torch.movedim(out_im, -1, axis)), -1).to(dtype)
