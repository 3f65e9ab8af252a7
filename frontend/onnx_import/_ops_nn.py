"""Convolution (CausalConvWithState included), pooling, unpooling, normalization, dropout.

Spatial ``pads`` are ``[b_1, ..., b_n, e_1, ..., e_n]`` (begins then ends); equal begins and ends map
onto torch's ``padding``, unequal ones become an explicit ``F.pad`` first. ``auto_pad=SAME_*`` pads
``total = max((ceil(in / s) - 1) * s + (k - 1) * d + 1 - in, 0)``, the odd cell at the end (UPPER)
or the beginning (LOWER).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._registry import OpCall, norm_axis, rule


def _geometry(
    n: OpCall, x: torch.Tensor, kernel: list[int]
) -> tuple[list[int], list[int], list[Any], list[Any]]:
    """strides, dilations, pad begins, pad ends."""
    rank = len(kernel)
    strides = n.attr("strides") or [1] * rank
    dil = n.attr("dilations") or [1] * rank
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(rank):
            size = x.shape[2 + i]
            total = torch.sym_max(
                (-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0
            )
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - small if auto == "SAME_UPPER" else small)
        return strides, dil, begins, ends
    pads = [0] * (2 * rank) if auto == "VALID" else (n.attr("pads") or [0] * (2 * rank))
    return strides, dil, list(pads[:rank]), list(pads[rank:])


def _torch_pads(begins: list[Any], ends: list[Any]) -> list[Any]:
    """ONNX per-axis (begin, end) -> F.pad order (last axis first)."""
    out: list[Any] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=False):
        out += [b, e]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@rule("Conv")
def conv(n: OpCall) -> torch.Tensor:
    return conv_nd(n, n.x(0), n.x(1), n.x(2))


def conv_nd(n: OpCall, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """aten.conv1d/2d/3d with the node's strides, dilations, group and pads."""
    kernel = n.attr("kernel_shape") or list(w.shape[2:])
    strides, dil, begins, ends = _geometry(n, x, kernel)
    if begins != ends:
        x, begins = F.pad(x, _torch_pads(begins, ends)), [0] * len(kernel)
    return _CONV[len(kernel)](x, w, b, strides, begins, dil, n.attr("group", 1))


@rule("ConvTranspose")
def conv_transpose(n: OpCall) -> torch.Tensor:
    """out = s * (in - 1) + output_padding + (k - 1) * d + 1 - pad_begin - pad_end; an ``output_shape``
    (or SAME auto_pad, output = in * s) fixes the total padding."""
    x, w, b = n.x(0), n.x(1), n.x(2)
    kernel = n.attr("kernel_shape") or list(w.shape[2:])
    rank = len(kernel)
    strides = n.attr("strides") or [1] * rank
    dil = n.attr("dilations") or [1] * rank
    out_pad = n.attr("output_padding") or [0] * rank
    auto = n.attr("auto_pad", "NOTSET")
    target = n.attr("output_shape")
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [x.shape[2 + i] * strides[i] for i in range(rank)]
    if target is not None:
        target = list(target)[-rank:]
        begins, ends = [], []
        for i in range(rank):
            total = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - target[i]
            upper = auto == "SAME_UPPER"
            begins.append(total // 2 if upper else total - total // 2)
            ends.append(total - total // 2 if upper else total // 2)
    else:
        pads = n.attr("pads") or [0] * (2 * rank)
        begins, ends = list(pads[:rank]), list(pads[rank:])
    group = n.attr("group", 1)
    fits = begins == ends and all(0 <= p < max(s, d) for p, s, d in zip(out_pad, strides, dil, strict=False))
    if fits and all(isinstance(p, int) and p >= 0 for p in begins):
        return _CONV_T[rank](x, w, b, strides, begins, out_pad, group, dil)
    y = _CONV_T[rank](x, w, None, strides, 0, 0, group, dil)
    y = F.pad(y, _torch_pads([-p for p in begins], [op - e for op, e in zip(out_pad, ends, strict=False)]))
    return y if b is None else y + b.reshape([1, -1] + [1] * rank)


# ---- pooling -----------------------------------------------------------------------------------
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_size(size: Any, k: int, s: int, d: int, begin: Any, end: Any, ceil: bool) -> Any:
    """ONNX output length: floor or ceil of (size + pads - dilated k) / s, plus 1; with ceil a last
    window starting in the end padding is dropped."""
    span = size + begin + end - ((k - 1) * d + 1)
    out = (-(-span // s) if ceil else span // s) + 1
    return out - 1 if ceil and (out - 1) * s >= size + begin else out


def _explicit_pool(
    x: torch.Tensor,
    pool: Any,
    kernel: list[int],
    strides: list[int],
    dil: list[int],
    begins: list[Any],
    ends: list[Any],
    value: float,
    ceil: bool,
) -> torch.Tensor:
    """Pad explicitly with ``value``, pool without padding, keep ONNX's output size."""
    y = pool(F.pad(x, _torch_pads(begins, ends), value=value))
    for i, k in enumerate(kernel):
        y = y.narrow(2 + i, 0, _pool_size(x.shape[2 + i], k, strides[i], dil[i], begins[i], ends[i], ceil))
    return y


def _torch_padding_ok(begins: list[Any], ends: list[Any], kernel: list[int], dil: list[int]) -> bool:
    """torch pools pad symmetrically and at most half the (dilated) window."""
    return begins == ends and all(
        p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begins, kernel, dil, strict=False)
    )


@rule("MaxPool")
def max_pool(n: OpCall) -> Any:
    """Optional second output: indices into the flattened input (row-major over N, C and space)."""
    x = n.x(0)
    kernel = n.attr("kernel_shape")
    rank = len(kernel)
    strides, dil, begins, ends = _geometry(n, x, kernel)
    ceil = bool(n.attr("ceil_mode", 0))
    want_idx = n.n_out > 1 and bool(n.node.output[1])
    xf = x if x.is_floating_point() else x.to(torch.float64)  # torch has no integer max pooling
    if not _torch_padding_ok(begins, ends, kernel, dil):
        if want_idx:
            raise n.fail("indices with asymmetric or wide pads are not supported")
        pool = functools.partial(
            _MAX_POOL[rank], kernel_size=kernel, stride=strides, dilation=dil, ceil_mode=ceil
        )
        return _explicit_pool(xf, pool, kernel, strides, dil, begins, ends, float("-inf"), ceil).to(x.dtype)
    if want_idx and n.attr("storage_order", 0):
        raise n.fail("indices in column-major storage_order=1 are not supported")
    y, idx = _MAX_POOL[rank](xf, kernel, strides, begins, dil, ceil, return_indices=True)
    y = y.to(x.dtype)
    if not want_idx:
        return y
    spatial = math.prod(x.shape[2:])
    plane = torch.arange(x.shape[0] * x.shape[1]).reshape([x.shape[0], x.shape[1]] + [1] * rank)
    return y, idx + plane * spatial


def _window_sum(
    x: torch.Tensor,
    kernel: list[int],
    strides: list[int],
    dil: list[int],
    begins: list[Any],
    ends: list[Any],
    ceil: bool,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Sum over each (dilated) pooling window of ``x`` padded with ``pad_value``, ONNX output size.
    Ceil mode pads s - 1 more zeros at the end so the last partial window exists, then narrows."""
    rank = len(kernel)
    xp = F.pad(x, _torch_pads(begins, ends), value=pad_value)
    xp = F.pad(xp, _torch_pads([0] * rank, [s - 1 if ceil else 0 for s in strides]))
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype)
    y = _CONV[rank](xp.reshape(-1, 1, *xp.shape[2:]), ones, None, strides, 0, dil)
    y = y.reshape(*x.shape[:2], *y.shape[2:])
    for i, k in enumerate(kernel):
        y = y.narrow(2 + i, 0, _pool_size(x.shape[2 + i], k, strides[i], dil[i], begins[i], ends[i], ceil))
    return y


@rule("AveragePool")
def average_pool(n: OpCall) -> torch.Tensor:
    """Mean over each window; padded cells count only with count_include_pad=1 (cells past the padding,
    in a ceil-mode window, never count)."""
    x = n.x(0)
    kernel = n.attr("kernel_shape")
    strides, dil, begins, ends = _geometry(n, x, kernel)
    ceil, include = bool(n.attr("ceil_mode", 0)), bool(n.attr("count_include_pad", 0))
    simple = (
        all(d == 1 for d in dil) and _torch_padding_ok(begins, ends, kernel, dil) and not (ceil and include)
    )
    if simple:
        return _AVG_POOL[len(kernel)](x, kernel, strides, begins, ceil, include)
    total = _window_sum(x, kernel, strides, dil, begins, ends, ceil)
    count = _window_sum(
        torch.ones_like(x[:1, :1]),
        kernel,
        strides,
        dil,
        begins,
        ends,
        ceil,
        pad_value=1.0 if include else 0.0,
    )
    return total / count


@rule("LpPool")
def lp_pool(n: OpCall) -> torch.Tensor:
    """(sum over the window of |x|^p)^(1/p), padded cells contributing 0."""
    x = n.x(0)
    kernel = n.attr("kernel_shape")
    strides, dil, begins, ends = _geometry(n, x, kernel)
    p = n.attr("p", 2)
    total = _window_sum(torch.abs(x) ** p, kernel, strides, dil, begins, ends, bool(n.attr("ceil_mode", 0)))
    return total ** (1.0 / p)


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def global_pool(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    dims = list(range(2, x.dim()))
    if n.op == "GlobalAveragePool":
        return torch.mean(x, dims, keepdim=True)
    if n.op == "GlobalMaxPool":
        return torch.amax(x, dims, keepdim=True)
    p = n.attr("p", 2)
    return torch.sum(torch.abs(x) ** p, dims, keepdim=True) ** (1.0 / p)


# ---- normalization -----------------------------------------------------------------------------
def _channel_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.reshape([1, -1] + [1] * (rank - 2))


@rule("BatchNormalization", consts=(), states=(3, 4))
def batch_norm(n: OpCall) -> Any:
    """Inference: aten.batch_norm(training=False) on running stats (ONNX momentum m is torch's 1 - m).
    training_mode=1: batch statistics; running stats become m * running + (1 - m) * batch."""
    x, scale, bias, mean, var = (n.x(i) for i in range(5))
    eps, momentum = n.attr("epsilon", 1e-5), n.attr("momentum", 0.9)
    if n.attr("spatial", 1) == 0:
        raise n.fail("spatial=0 (per-activation statistics, opset < 9) is not supported")
    if not n.attr("training_mode", 0):
        if n.n_out > 1 and any(n.node.output[1:]):
            raise n.fail("statistics outputs outside training mode (opset < 9) are not supported")
        return F.batch_norm(x, mean, var, scale, bias, False, 1.0 - momentum, eps)
    dims = [0] + list(range(2, x.dim()))
    bmean, bvar = torch.mean(x, dims), torch.var(x, dims, unbiased=False)
    y = (x - _channel_view(bmean, x.dim())) / torch.sqrt(_channel_view(bvar, x.dim()) + eps)
    y = y * _channel_view(scale, x.dim()) + _channel_view(bias, x.dim())
    return y, momentum * mean + (1 - momentum) * bmean, momentum * var + (1 - momentum) * bvar


@rule("InstanceNormalization")
def instance_norm(n: OpCall) -> torch.Tensor:
    return F.instance_norm(n.x(0), weight=n.x(1), bias=n.x(2), eps=n.attr("epsilon", 1e-5))


@rule("LayerNormalization")
def layer_norm(n: OpCall) -> Any:
    """Normalize over axes [axis, rank); outputs 2 and 3 are the mean and 1/sqrt(var + eps)."""
    x, scale, bias = n.x(0), n.x(1), n.x(2)
    axis = norm_axis(n.attr("axis", -1), x.dim())
    eps = n.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    stats = n.n_out > 1 and any(n.node.output[1:])
    exact = tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape)
    if not stats and exact and x.dtype in (torch.float32, torch.float64):
        return F.layer_norm(x, shape, scale, bias, eps)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dims = list(range(axis, x.dim()))
    mean = torch.mean(xf, dims, keepdim=True)
    inv = torch.rsqrt(torch.mean((xf - mean) ** 2, dims, keepdim=True) + eps)
    y = ((xf - mean) * inv).to(x.dtype) * scale
    y = y if bias is None else y + bias
    return y, mean, inv


@rule("GroupNormalization")
def group_norm(n: OpCall) -> torch.Tensor:
    """Opset 18 gives one scale/bias per group, opset 21 one per channel."""
    x, scale, bias = n.x(0), n.x(1), n.x(2)
    groups = n.attr("num_groups")
    if n.opset < 21:
        per = x.shape[1] // groups
        scale, bias = scale.repeat_interleave(per), bias.repeat_interleave(per)
    return F.group_norm(x, groups, scale, bias, n.attr("epsilon", 1e-5))


@rule("LRN")
def lrn(n: OpCall) -> torch.Tensor:
    """x / (bias + alpha / size * s)^beta, s = sum of x^2 over channels [c - floor((size-1)/2),
    c + ceil((size-1)/2)]."""
    x = n.x(0)
    size = n.attr("size")
    alpha, beta, bias = n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    sq = torch.movedim(x * x, 1, -1)
    sq = F.pad(sq, [(size - 1) // 2, size // 2]).unfold(-1, size, 1).sum(-1)
    return x / (bias + alpha / size * torch.movedim(sq, -1, 1)) ** beta


@rule("MeanVarianceNormalization")
def mean_variance_norm(n: OpCall) -> torch.Tensor:
    """(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9) over ``axes``."""
    x = n.x(0)
    axes = n.attr("axes", [0, 2, 3])
    mean = torch.mean(x, axes, keepdim=True)
    std = torch.sqrt(torch.mean(x * x, axes, keepdim=True) - mean * mean)
    return (x - mean) / (std + 1e-9)


@rule("Dropout", consts=(1, 2))
def dropout(n: OpCall) -> Any:
    """Inference: the identity, and an all-true mask."""
    x = n.x(0)
    training = n.opset >= 12 and n.has(2) and bool(n.const(2).item())
    ratio = n.floats(1)[0] if n.opset >= 12 and n.has(1) else n.attr("ratio", 0.5)
    if training and ratio > 0:
        raise n.fail("training-mode dropout draws random numbers; import inference graphs")
    if n.n_out > 1 and n.node.output[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@rule("MaxUnpool", consts=(2,))
def max_unpool(n: OpCall) -> torch.Tensor:
    """Scatter x into zeros of the inferred size (in - 1) * s + k - pads at MaxPool's flat indices; a
    larger ``output_shape`` zero-pads that at the end of each axis."""
    x, idx = n.x(0), n.x(1)
    kernel = n.attr("kernel_shape")
    rank = len(kernel)
    strides = n.attr("strides") or [1] * rank
    pads = n.attr("pads") or [0] * (2 * rank)
    shape = [
        *x.shape[:2],
        *((x.shape[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + rank] for i in range(rank)),
    ]
    y = torch.zeros(math.prod(shape), dtype=x.dtype).scatter(0, idx.reshape(-1), x.reshape(-1)).reshape(shape)
    target = n.ints(2)
    if target is None:
        return y
    return F.pad(y, _torch_pads([0] * len(shape), [t - s for t, s in zip(target, shape, strict=False)]))


@rule("Col2Im", consts=(1, 2))
def col2im(n: OpCall) -> torch.Tensor:
    """Sum sliding blocks back into an image (torch.nn.functional.fold; 2-D, symmetric pads)."""
    image, block = n.ints(1), n.ints(2)
    rank = len(image)
    pads = n.attr("pads") or [0] * (2 * rank)
    if rank != 2 or pads[:rank] != pads[rank:]:
        raise n.fail(f"{rank}-D images or asymmetric pads are not supported")
    return F.fold(
        n.x(0),
        image,
        block,
        dilation=n.attr("dilations") or 1,
        padding=pads[:rank],
        stride=n.attr("strides") or 1,
    )


@rule("CausalConvWithState")
def causal_conv_with_state(n: OpCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d over [past_state (k - 1 steps, zeros if absent), x]; optional SiLU;
    the second output is the last k - 1 steps, the next call's state."""
    x, w, b, past = n.x(0), n.x(1), n.x(2), n.x(3)
    k = w.shape[2]
    if past is None:
        past = torch.zeros((x.shape[0], x.shape[1], k - 1), dtype=x.dtype)
    padded = torch.cat((past, x), 2)
    y = F.conv1d(padded, w, b, groups=x.shape[1])
    if n.attr("activation", "none") in ("silu", "swish"):
        y = F.silu(y.float()).to(x.dtype)
    return y, padded[:, :, padded.shape[2] - (k - 1) :]
