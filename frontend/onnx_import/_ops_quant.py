"""Quantization ops (8-bit and 16-bit integer types torch can hold).

quantize:   q = saturate(round_half_even(x / scale) + zero_point)
dequantize: x = (q - zero_point) * scale
Scales and zero points are per tensor (0-d or one element), per ``axis`` (1-D) or per block along
``axis`` (``block_size``, opset 21). Integer products (MatMulInteger, ConvInteger, QLinear*) are
computed in float64, exact for 8-bit operands up to 2^53 accumulated magnitude.
"""

from __future__ import annotations

from typing import Any

import torch

from regc.frontend.onnx_import._dtypes import torch_dtype
from regc.frontend.onnx_import._ops_nn import conv_nd
from regc.frontend.onnx_import._registry import OpCall, norm_axis, rule


def _along(n: OpCall, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a per-tensor, per-axis or per-block parameter against ``x``."""
    if t is None or t.dim() == 0 or t.numel() == 1 and x.dim() == 0:
        return t
    axis = norm_axis(n.attr("axis", 1), x.dim())
    block = n.attr("block_size", 0)
    if block:
        return torch.repeat_interleave(t, block, dim=axis).narrow(axis, 0, x.shape[axis])
    if t.numel() == 1:
        return t.reshape(())
    return t.reshape([-1 if d == axis else 1 for d in range(x.dim())])


def _saturate(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    return torch.clamp(q, info.min, info.max).to(dtype)


def quantize(x: torch.Tensor, scale: Any, zero: Any, dtype: torch.dtype) -> torch.Tensor:
    q = torch.round(x / scale)
    return _saturate(q if zero is None else q + zero, dtype)


@rule("QuantizeLinear")
def quantize_linear(n: OpCall) -> torch.Tensor:
    x, zp = n.x(0), n.x(2)
    if n.attr("output_dtype", 0) and zp is None:
        dtype = torch_dtype(n.attr("output_dtype"), f"output_dtype of node '{n.name}'")
    else:
        dtype = torch.uint8 if zp is None else zp.dtype
    scale = _along(n, n.x(1), x)
    zero = _along(n, zp, x)
    return quantize(
        x.to(scale.dtype) if x.dtype != scale.dtype else x,
        scale,
        None if zero is None else zero.to(scale.dtype),
        dtype,
    )


@rule("DequantizeLinear")
def dequantize_linear(n: OpCall) -> torch.Tensor:
    x, zp = n.x(0), n.x(2)
    scale = _along(n, n.x(1), x)
    zero = _along(n, zp, x)
    centered = x.to(torch.int32) if zero is None else x.to(torch.int32) - zero.to(torch.int32)
    return centered.to(scale.dtype) * scale


@rule("DynamicQuantizeLinear")
def dynamic_quantize_linear(n: OpCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 with scale = (max(x, 0) - min(x, 0)) / 255 and zero point round(-min / scale)."""
    x = n.x(0)
    lo = torch.clamp(torch.amin(x), max=0.0)
    hi = torch.clamp(torch.amax(x), min=0.0)
    scale = (hi - lo) / 255.0
    zp = _saturate(torch.round(-lo / scale), torch.uint8)
    return quantize(x, scale, zp.to(x.dtype), torch.uint8), scale, zp


def _centered(t: torch.Tensor, zp: torch.Tensor | None, shape: list[int] | None = None) -> torch.Tensor:
    t = t.to(torch.float64)
    if zp is None:
        return t
    zp = zp.to(torch.float64)
    return t - (zp.reshape(shape) if shape is not None and zp.dim() == 1 else zp)


@rule("MatMulInteger")
def matmul_integer(n: OpCall) -> torch.Tensor:
    """(A - a_zp) @ (B - b_zp) in int32; a_zp per row (1-D [M]), b_zp per column (1-D [N])."""
    a = _centered(n.x(0), n.x(2), [-1, 1])
    b = _centered(n.x(1), n.x(3))
    return torch.matmul(a, b).to(torch.int32)


@rule("ConvInteger")
def conv_integer(n: OpCall) -> torch.Tensor:
    x = _centered(n.x(0), n.x(2))
    w = _centered(n.x(1), n.x(3), [-1, 1, 1, 1][: n.x(1).dim()])
    return conv_nd(n, x, w, None).to(torch.int32)


@rule("QLinearMatMul")
def qlinear_matmul(n: OpCall) -> torch.Tensor:
    """quantize(((A - a_zp) * a_scale) @ ((B - b_zp) * b_scale), y_scale, y_zp)."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (n.x(i) for i in range(8))
    acc = torch.matmul(_centered(a, a_zp, [-1, 1]), _centered(b, b_zp))
    real = (
        acc
        * (a_s.to(torch.float64).reshape(-1, 1) if a_s.dim() == 1 else a_s.to(torch.float64))
        * b_s.to(torch.float64)
    )
    return quantize(real, y_s.to(torch.float64), y_zp.to(torch.float64), y_zp.dtype)


@rule("QLinearConv")
def qlinear_conv(n: OpCall) -> torch.Tensor:
    """quantize(conv(x - x_zp, w - w_zp) * x_scale * w_scale + B * x_scale * w_scale, y_scale, y_zp)."""
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp, bias = (n.x(i) for i in range(9))
    shape = [-1] + [1] * (w.dim() - 1)
    acc = conv_nd(n, _centered(x, x_zp), _centered(w, w_zp, shape), None)
    if bias is not None:
        acc = acc + bias.to(torch.float64).reshape([1, -1] + [1] * (acc.dim() - 2))
    ws = w_s.to(torch.float64)
    ws = ws.reshape([1, -1] + [1] * (acc.dim() - 2)) if ws.dim() == 1 else ws
    return quantize(
        acc * x_s.to(torch.float64) * ws, y_s.to(torch.float64), y_zp.to(torch.float64), y_zp.dtype
    )
