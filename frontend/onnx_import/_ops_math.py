"""Elementwise math, comparisons, logic, activations, softmax family, reductions and matrix products.

ONNX broadcasting is numpy's, like torch's. Integer semantics follow ONNX: ``Div`` truncates toward
zero, ``Mod`` takes the divisor's sign unless ``fmod=1``, ``Round`` is half to even.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._dtypes import torch_dtype
from regc.frontend.onnx_import._registry import OpCall, norm_axis, numel, rule

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Erf": torch.erf,
    "Sign": torch.sign,
    "IsNaN": torch.isnan,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Relu": torch.relu,
    "Not": torch.logical_not,
    "BitwiseNot": torch.bitwise_not,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
    "Det": torch.linalg.det,
}
_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Equal": torch.eq,
    "Greater": torch.gt,
    "Less": torch.lt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}


def _unary(n: OpCall) -> torch.Tensor:
    return _UNARY[n.op](n.x(0))


def _binary(n: OpCall) -> torch.Tensor:
    if n.attr("broadcast") and n.attr("axis") is not None:
        raise n.fail("legacy broadcast with an axis (opset < 7) is not supported")
    return _BINARY[n.op](n.x(0), n.x(1))


rule(*_UNARY)(_unary)
rule(*_BINARY)(_binary)


@rule("Identity")
def identity(n: OpCall) -> Any:
    return n.raw(0)


@rule("Div")
def div(n: OpCall) -> torch.Tensor:
    """Integer division truncates toward zero (C semantics), floats divide exactly."""
    a, b = n.x(0), n.x(1)
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


@rule("Mod")
def mod(n: OpCall) -> torch.Tensor:
    """fmod=1: sign of the dividend (C fmod); fmod=0: sign of the divisor (Python %)."""
    a, b = n.x(0), n.x(1)
    return torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)


@rule("Pow")
def pow_(n: OpCall) -> torch.Tensor:
    """The result has the base's type, whatever the exponent's type."""
    a = n.x(0)
    return torch.pow(a, n.x(1)).to(a.dtype)


@rule("BitShift")
def bit_shift(n: OpCall) -> torch.Tensor:
    a, b = n.x(0), n.x(1)
    return (
        torch.bitwise_left_shift(a, b) if n.attr("direction") == "LEFT" else torch.bitwise_right_shift(a, b)
    )


@rule("IsInf")
def is_inf(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    if neg:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


@rule("Max", "Min", "Sum", "Mean")
def variadic(n: OpCall) -> torch.Tensor:
    """Broadcasting n-ary max/min/sum/mean."""
    xs = n.xs()
    op = {"Max": torch.maximum, "Min": torch.minimum}.get(n.op, torch.add)
    y = functools.reduce(op, xs)
    return y / len(xs) if n.op == "Mean" else y


@rule("Where")
def where(n: OpCall) -> torch.Tensor:
    return torch.where(n.x(0), n.x(1), n.x(2))


@rule("Clip")
def clip(n: OpCall) -> torch.Tensor:
    """min(max(x, lo), hi); bounds are attributes before opset 11, optional inputs after."""
    x = n.x(0)
    if n.opset < 11:
        return torch.clamp(x, n.attr("min"), n.attr("max"))
    lo, hi = n.x(1), n.x(2)
    if lo is not None and hi is not None:
        return torch.minimum(torch.maximum(x, lo), hi)
    if lo is not None:
        return torch.maximum(x, lo)
    return x if hi is None else torch.minimum(x, hi)


# ---- casts -------------------------------------------------------------------------------------
@rule("Cast")
def cast(n: OpCall) -> torch.Tensor:
    return n.x(0).to(torch_dtype(n.attr("to"), f"Cast target of node '{n.name}'"))


@rule("CastLike")
def cast_like(n: OpCall) -> torch.Tensor:
    return n.x(0).to(n.x(1).dtype)


# ---- activations -------------------------------------------------------------------------------
@rule("LeakyRelu")
def leaky_relu(n: OpCall) -> torch.Tensor:
    return F.leaky_relu(n.x(0), n.attr("alpha", 0.01))


@rule("Elu")
def elu(n: OpCall) -> torch.Tensor:
    return F.elu(n.x(0), n.attr("alpha", 1.0))


@rule("Selu")
def selu(n: OpCall) -> torch.Tensor:
    """gamma * (x if x > 0 else alpha * (exp(x) - 1))."""
    x = n.x(0)
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@rule("Celu")
def celu(n: OpCall) -> torch.Tensor:
    return F.celu(n.x(0), n.attr("alpha", 1.0))


@rule("Gelu")
def gelu(n: OpCall) -> torch.Tensor:
    return F.gelu(n.x(0), approximate=n.attr("approximate", "none"))


@rule("HardSigmoid")
def hard_sigmoid(n: OpCall) -> torch.Tensor:
    """max(0, min(1, alpha * x + beta))."""
    return torch.clamp(n.attr("alpha", 0.2) * n.x(0) + n.attr("beta", 0.5), 0, 1)


@rule("Softplus")
def softplus(n: OpCall) -> torch.Tensor:
    """log(1 + exp(x)), without torch's linear cut-over."""
    return torch.logaddexp(n.x(0), torch.zeros((), dtype=n.x(0).dtype))


@rule("ThresholdedRelu")
def thresholded_relu(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    return torch.where(x > n.attr("alpha", 1.0), x, torch.zeros((), dtype=x.dtype))


@rule("PRelu")
def prelu(n: OpCall) -> torch.Tensor:
    """x if x >= 0 else slope * x, slope broadcast to x."""
    x = n.x(0)
    return torch.where(x < 0, n.x(1) * x, x)


@rule("Shrink")
def shrink(n: OpCall) -> torch.Tensor:
    """x + bias if x < -lambd; x - bias if x > lambd; else 0."""
    x = n.x(0)
    lambd, bias = n.attr("lambd", 0.5), n.attr("bias", 0.0)
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)


def _softmax_like(n: OpCall, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Before opset 13 the input is coerced to 2-D [prod(shape[:axis]), prod(shape[axis:])] (axis=1)."""
    x = n.x(0)
    if n.opset >= 13:
        return fn(x, n.attr("axis", -1))
    axis = norm_axis(n.attr("axis", 1), x.dim())
    shape = x.shape
    return fn(x.reshape(numel(shape[:axis]), numel(shape[axis:])), 1).reshape(shape)


def _hardmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    """1 at the first maximum along ``axis``, 0 elsewhere."""
    idx = torch.argmax(x, dim=axis, keepdim=True)
    return torch.zeros_like(x).scatter(axis, idx, 1.0)


@rule("Softmax")
def softmax(n: OpCall) -> torch.Tensor:
    return _softmax_like(n, lambda x, a: torch.softmax(x, a))


@rule("LogSoftmax")
def log_softmax(n: OpCall) -> torch.Tensor:
    return _softmax_like(n, lambda x, a: torch.log_softmax(x, a))


@rule("Hardmax")
def hardmax(n: OpCall) -> torch.Tensor:
    return _softmax_like(n, _hardmax)


# ---- reductions --------------------------------------------------------------------------------
_AXES_AS_INPUT = {"ReduceSum": 13}  # others moved axes to an input in opset 18
_REDUCERS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}
_FLOAT_ONLY = {"ReduceMean", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"}


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


def reduce_axes(n: OpCall, slot: int, since: int) -> list[int] | None:
    """The reduced axes: attribute before ``since``, optional input from then; None = no-op."""
    rank = n.x(0).dim()
    axes = n.attr("axes") if n.opset < since else n.ints(slot)
    if not axes:
        if n.opset >= since and n.attr("noop_with_empty_axes", 0):
            return None
        return list(range(rank))
    return sorted({norm_axis(a, rank) for a in axes})


@rule(*_REDUCERS, consts=(1,))
def reduce(n: OpCall) -> torch.Tensor:
    """Reduce over ``axes`` (all when empty); ReduceMax/Min of an empty set give -inf/+inf like ONNX."""
    x = n.x(0)
    dims = reduce_axes(n, 1, _AXES_AS_INPUT.get(n.op, 18))
    if dims is None:
        return x
    keep = bool(n.attr("keepdims", 1))
    if n.op in ("ReduceMax", "ReduceMin") and any(x.shape[d] == 0 for d in dims):
        shape = (
            [1 if d in dims else s for d, s in enumerate(x.shape)]
            if keep
            else [s for d, s in enumerate(x.shape) if d not in dims]
        )
        fill: Any = float("-inf") if n.op == "ReduceMax" else float("inf")
        if x.dtype == torch.bool:
            fill = n.op == "ReduceMin"
        elif not x.is_floating_point():
            info = torch.iinfo(x.dtype)
            fill = info.min if n.op == "ReduceMax" else info.max
        return torch.full(shape, fill, dtype=x.dtype)
    if n.op in _FLOAT_ONLY and not x.is_floating_point():
        return _REDUCERS[n.op](x.double(), dims, keep).to(x.dtype)
    return _REDUCERS[n.op](x, dims, keep)


@rule("ArgMax", "ArgMin")
def arg_extreme(n: OpCall) -> torch.Tensor:
    """Index of the first (or, with select_last_index, last) extreme value along ``axis``."""
    x = n.x(0)
    axis = norm_axis(n.attr("axis", 0), x.dim())
    keep = bool(n.attr("keepdims", 1))
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    if n.attr("select_last_index", 0):
        return x.shape[axis] - 1 - fn(torch.flip(x, (axis,)), dim=axis, keepdim=keep)
    return fn(x, dim=axis, keepdim=keep)


_SCANS = {"CumSum": (torch.cumsum, 0), "CumProd": (torch.cumprod, 1)}


@rule(*_SCANS, consts=(1,))
def cumulative(n: OpCall) -> torch.Tensor:
    """Running sum/product along ``axis``; exclusive: start from the identity and drop the last element;
    reverse: run from the end."""
    x = n.x(0)
    fn, identity = _SCANS[n.op]
    axis = norm_axis(n.int(1), x.dim())
    reverse = n.attr("reverse", 0)
    if reverse:
        x = torch.flip(x, (axis,))
    if n.attr("exclusive", 0):
        first = torch.full_like(x.narrow(axis, 0, 1), identity)
        x = torch.cat((first, x.narrow(axis, 0, x.shape[axis] - 1)), axis)
    y = fn(x, axis, dtype=x.dtype)
    return torch.flip(y, (axis,)) if reverse else y


@rule("LpNormalization")
def lp_normalization(n: OpCall) -> torch.Tensor:
    """x / ||x||_p along ``axis`` (0 where the norm is 0)."""
    x = n.x(0)
    norm = torch.linalg.vector_norm(x, n.attr("p", 2), dim=n.attr("axis", -1), keepdim=True)
    return torch.where(norm == 0, torch.zeros((), dtype=x.dtype), x / norm)


@rule("BitCast")
def bit_cast(n: OpCall) -> torch.Tensor:
    """Reinterpret the bits as another type of the same width."""
    x = n.x(0)
    dtype = torch_dtype(n.attr("to"), f"BitCast target of node '{n.name}'")
    if dtype.itemsize != x.dtype.itemsize:
        raise n.fail(f"BitCast between {x.dtype} and {dtype} of different widths")
    return x.view(dtype)


# ---- matrix products ---------------------------------------------------------------------------
@rule("MatMul")
def matmul(n: OpCall) -> torch.Tensor:
    return torch.matmul(n.x(0), n.x(1))


def _gemm_prepare(attrs: dict[str, Any], slot: int, value: torch.Tensor) -> torch.Tensor:
    """Store a constant B as the [N, K] weight of aten.linear (transpose when transB=0)."""
    if slot == 1 and not attrs.get("transB", 0):
        return value.t().contiguous()
    return value


@rule("Gemm", prepare=_gemm_prepare)
def gemm(n: OpCall) -> torch.Tensor:
    """alpha * A' @ B' + beta * C; with B an initializer: aten.linear(A', W[, C])."""
    a, b, c = n.x(0), n.x(1), n.x(2)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if n.attr("transA", 0):
        a = a.t()
    if n.is_param(1):  # already [N, K]
        bias_ok = c is not None and beta == 1.0 and alpha == 1.0 and c.dim() == 1
        y = F.linear(a, b, c if bias_ok else None)
        if bias_ok:
            return y
    else:
        y = torch.matmul(a, b.t() if n.attr("transB", 0) else b)
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@rule("Einsum")
def einsum(n: OpCall) -> torch.Tensor:
    return torch.einsum(n.attr("equation").replace(" ", ""), *n.xs())
