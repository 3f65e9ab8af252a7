"""Resize, Upsample, GridSample and AffineGrid.

Resizing is separable: each resized axis maps output position y to a source coordinate x
(``coordinate_transformation_mode``, e.g. half_pixel: x = (y + 0.5) / scale - 0.5) and mixes the n
nearest input cells (edge-clamped) with weights from the mode (nearest: one cell, linear: 2, cubic: 4,
antialias widens the kernel when downscaling). The common cases become ``F.interpolate`` (one
``aten.upsample_*`` op); all others gather the taps and weigh them, computed from static sizes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._registry import OpCall, rule

_Coeffs = Callable[[float, float], np.ndarray]


def _nearest(mode: str) -> _Coeffs:
    def coeffs(r: float, scale: float) -> np.ndarray:
        if float(r).is_integer():
            return np.array([0.0, 1.0])
        take_hi = {
            "round_prefer_floor": r > 0.5,
            "round_prefer_ceil": r >= 0.5,
            "floor": False,
            "ceil": True,
        }[mode]
        return np.array([0.0, 1.0]) if take_hi else np.array([1.0, 0.0])

    return coeffs


def _linear(antialias: bool) -> _Coeffs:
    def coeffs(r: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([1 - r, r])
        scale = min(scale, 1.0)
        start = int(np.floor(-1 / scale) + 1)
        c = np.clip(1 - np.abs((np.arange(start, 2 - start) - r) * scale), 0, 1)
        return c / c.sum()

    return coeffs


def _cubic(a: float, antialias: bool) -> _Coeffs:
    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    def coeffs(r: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([kernel(r + 1), kernel(r), kernel(1 - r), kernel(2 - r)])
        scale = min(scale, 1.0)
        start = int(np.floor(-2 / scale) + 1)
        c = np.array([kernel(scale * (i - r)) for i in range(start, 2 - start)])
        return c / c.sum()

    return coeffs


def _source_coords(
    ctm: str, out: int, size: int, scale: float, roi: tuple[float, float] | None
) -> np.ndarray:
    y = np.arange(out, dtype=np.float64)
    width = scale * size
    if ctm == "align_corners":
        return np.zeros(out) if width == 1 else y * (size - 1) / (width - 1)
    if ctm == "asymmetric":
        return y / scale
    if ctm == "tf_crop_and_resize":
        lo, hi = roi
        x = (
            np.full(out, (hi - lo) * (size - 1) / 2)
            if width == 1
            else y * (hi - lo) * (size - 1) / (width - 1)
        )
        return x + lo * (size - 1)
    if ctm == "pytorch_half_pixel":
        return np.full(out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    if ctm == "half_pixel_symmetric":
        return size / 2 * (1 - out / width) + (y + 0.5) / scale - 0.5
    return (y + 0.5) / scale - 0.5  # half_pixel


def _taps(
    coeffs: _Coeffs, ctm: str, out: int, size: int, scale: float, roi: Any, exclude_outside: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(indices [out, n], weights [out, n], extrapolated [out] or None) along one axis."""
    x = _source_coords(ctm, out, size, scale, roi)
    base = np.floor(x)
    ratios = np.where(x == base, 1.0, x - base)
    w = np.stack([coeffs(float(r), scale) for r in ratios])
    taps = w.shape[1]
    pad = math.ceil(taps / 2)
    xp = x + pad
    frac = xp - np.floor(xp)
    if taps % 2 == 0:
        offset = np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((taps - 1) // 2), -((taps - 1) // 2) + 1)
    idx = (np.floor(xp).astype(np.int64) + offset)[:, None] + np.arange(taps)[None, :] - pad
    if exclude_outside:
        w = np.where((idx < 0) | (idx >= size), 0.0, w)
        total = w.sum(-1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    extrapolated = (x < 0) | (x > size - 1) if ctm == "tf_crop_and_resize" else None
    return np.clip(idx, 0, size - 1), w, extrapolated


def _resize_axis(
    x: torch.Tensor,
    axis: int,
    idx: np.ndarray,
    w: np.ndarray,
    extrap: np.ndarray | None,
    fill: float,
    nearest: bool,
) -> torch.Tensor:
    out, taps = idx.shape
    if nearest:
        pick = idx[np.arange(out), np.argmax(w, axis=1)]
        y = torch.index_select(x, axis, torch.from_numpy(pick))
    else:
        g = torch.index_select(x, axis, torch.from_numpy(idx.reshape(-1)))
        g = g.reshape((*x.shape[:axis], out, taps, *x.shape[axis + 1 :]))
        weights = (
            torch.from_numpy(w).to(x.dtype).reshape((1,) * axis + (out, taps) + (1,) * (x.dim() - axis - 1))
        )
        y = torch.sum(g * weights, axis + 1)
    if extrap is not None and extrap.any():
        mask = torch.from_numpy(extrap).reshape((1,) * axis + (out,) + (1,) * (x.dim() - axis - 1))
        y = torch.where(mask, torch.tensor(fill, dtype=y.dtype), y)
    return y


def _plan(
    n: OpCall, x: torch.Tensor, scales: list[float] | None, sizes: list[int] | None, axes: list[int]
) -> tuple[list[float], list[int]]:
    """Per-axis (scale, output size) for the resized ``axes``."""
    shape = [int(s) for s in x.shape]
    if sizes is None:
        return scales, [int(math.floor(shape[a] * s)) for a, s in zip(axes, scales, strict=False)]
    scales = [o / shape[a] for a, o in zip(axes, sizes, strict=False)]
    policy = n.attr("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        s = min(scales) if policy == "not_larger" else max(scales)
        scales = [s] * len(axes)
        sizes = [int(s * shape[a] + 0.5) for a in axes]
    return scales, list(sizes)


def resize_tensor(
    n: OpCall,
    x: torch.Tensor,
    scales: list[float] | None,
    sizes: list[int] | None,
    roi: list[float] | None,
    ctm: str,
    nearest_mode: str,
) -> torch.Tensor:
    rank = x.dim()
    axes = n.attr("axes")
    axes = [a % rank for a in axes] if axes else list(range(rank))
    scales, outs = _plan(n, x, scales, sizes, axes)
    mode = n.attr("mode", "nearest")
    antialias = bool(n.attr("antialias", 0))
    exclude = bool(n.attr("exclude_outside", 0))
    a = n.attr("cubic_coeff_a", -0.75)
    fast = _interpolate(
        x, axes, scales, outs, sizes is not None, mode, ctm, nearest_mode, antialias or exclude or a != -0.75
    )
    if fast is not None:
        return fast
    if mode == "nearest":
        coeffs = _nearest(nearest_mode)
    else:
        coeffs = _linear(antialias) if mode == "linear" else _cubic(a, antialias)
    floating = x.is_floating_point()
    y = x if floating or mode == "nearest" else x.double()
    for j, axis in enumerate(axes):
        axis_roi = (roi[j], roi[j + len(axes)]) if roi else None
        if math.isclose(scales[j], 1.0) and outs[j] == y.shape[axis] and ctm != "tf_crop_and_resize":
            continue
        idx, w, extrap = _taps(coeffs, ctm, outs[j], int(y.shape[axis]), scales[j], axis_roi, exclude)
        y = _resize_axis(y, axis, idx, w, extrap, n.attr("extrapolation_value", 0.0), mode == "nearest")
    if not floating and mode != "nearest":
        info = torch.iinfo(x.dtype)
        y = torch.clamp(torch.round(y), info.min, info.max).to(x.dtype)
    return y


def _interpolate(
    x: torch.Tensor,
    axes: list[int],
    scales: list[float],
    outs: list[int],
    by_size: bool,
    mode: str,
    ctm: str,
    nearest_mode: str,
    special: bool,
) -> torch.Tensor | None:
    """F.interpolate when it computes exactly what ONNX asks, else None. torch maps output cell y to
    y / factor (or y * in / out when given sizes), as ONNX does for the scales (or sizes) it was given."""
    spatial = list(range(2, x.dim()))
    resized = [
        a
        for a, s, o in zip(axes, scales, outs, strict=False)
        if not (math.isclose(s, 1.0) and o == x.shape[a])
    ]
    if special or x.dim() not in (3, 4, 5) or any(a < 2 for a in resized):
        return None
    by_axis = dict(zip(axes, zip(scales, outs, strict=False), strict=False))
    factors = [by_axis.get(a, (1.0, x.shape[a]))[0] for a in spatial]
    sizes = [by_axis.get(a, (1.0, x.shape[a]))[1] for a in spatial]
    size_or_factor: dict[str, Any] = (
        {"size": sizes} if by_size else {"scale_factor": factors, "recompute_scale_factor": False}
    )
    if mode == "nearest" and ctm == "asymmetric" and nearest_mode == "floor":
        return F.interpolate(x, mode="nearest", **size_or_factor)
    if mode == "nearest" or (mode == "cubic" and x.dim() != 4) or any(o <= 1 for o in sizes):
        return None
    torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()] if mode == "linear" else "bicubic"
    if ctm in ("half_pixel", "pytorch_half_pixel"):
        return F.interpolate(x, mode=torch_mode, align_corners=False, **size_or_factor)
    exact = by_size or all(
        float(f * x.shape[a]) == o for a, f, o in zip(spatial, factors, sizes, strict=False)
    )
    if ctm == "align_corners" and exact:  # ONNX aligns on in * scale, torch on the integer size
        return F.interpolate(x, size=sizes, mode=torch_mode, align_corners=True)
    return None


@rule("Resize", consts=(1, 2, 3))
def resize(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    nearest_mode = n.attr("nearest_mode", "round_prefer_floor")
    if n.opset < 11:
        return resize_tensor(n, x, n.floats(1), None, None, "asymmetric", nearest_mode)
    scales = n.floats(2) if n.has(2) and n.const(2).numel() else None
    sizes = n.ints(3) if n.has(3) else None
    roi = n.floats(1) if n.has(1) and n.const(1).numel() else None
    ctm = n.attr("coordinate_transformation_mode", "half_pixel")
    return resize_tensor(n, x, scales, sizes, roi, ctm, nearest_mode)


@rule("Upsample", consts=(1,))
def upsample(n: OpCall) -> torch.Tensor:
    """Resize with asymmetric coordinates and floor for nearest (opset 7 scales attribute, 9 input)."""
    scales = n.attr("scales") if n.opset < 9 else n.floats(1)
    return resize_tensor(n, n.x(0), scales, None, None, "asymmetric", "floor")


_GRID_MODES = {
    "linear": "bilinear",
    "bilinear": "bilinear",
    "nearest": "nearest",
    "cubic": "bicubic",
    "bicubic": "bicubic",
}


@rule("GridSample")
def grid_sample(n: OpCall) -> torch.Tensor:
    """Sample x at the normalized [-1, 1] grid locations (torch.nn.functional.grid_sample)."""
    x = n.x(0)
    mode = _GRID_MODES[n.attr("mode", "linear" if n.opset >= 20 else "bilinear")]
    if x.dim() != 4 and not (x.dim() == 5 and mode != "bicubic"):
        raise n.fail(f"{x.dim() - 2}-D sampling with mode {mode} is not supported")
    return F.grid_sample(
        x,
        n.x(1),
        mode=mode,
        padding_mode=n.attr("padding_mode", "zeros"),
        align_corners=bool(n.attr("align_corners", 0)),
    )


@rule("AffineGrid", consts=(1,))
def affine_grid(n: OpCall) -> torch.Tensor:
    return F.affine_grid(n.x(0), n.ints(1), align_corners=bool(n.attr("align_corners", 0)))
