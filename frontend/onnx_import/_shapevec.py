"""Shape arithmetic on ``ShapeVec``s: the ops exporters put between ``Shape`` and ``Reshape``.

When an input of one of these ops is a ``ShapeVec`` (and the others are small known integers), the
op is computed element by element on Python ints / ``torch.SymInt``s, so sizes stay symbolic for
torch.export. Anything else returns ``NotImplemented`` and the op's tensor rule runs instead.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch
from onnx import TensorProto

from regc.frontend.onnx_import._registry import OpCall, ShapeVec, norm_axis

__all__ = ["SHAPE_RULES"]

SHAPE_RULES: dict[str, Callable[[OpCall], Any]] = {}


def _shape_rule(*ops: str) -> Callable[[Callable[[OpCall], Any]], Callable[[OpCall], Any]]:
    def register(fn: Callable[[OpCall], Any]) -> Callable[[OpCall], Any]:
        SHAPE_RULES.update(dict.fromkeys(ops, fn))
        return fn

    return register


def _vec(n: OpCall, i: int) -> ShapeVec | None:
    """Input ``i`` as a ShapeVec when it is one or a small known integer or bool tensor."""
    v = n.raw(i)
    if isinstance(v, ShapeVec):
        return v
    known = n.known_list(i)
    c = n.const(i) if known is not None else None
    if c is not None and c.dim() <= 1 and (c.dtype == torch.bool or not c.is_floating_point()):
        return ShapeVec(
            known, scalar=c.dim() == 0, dtype=torch.bool if c.dtype == torch.bool else torch.int64
        )
    return None


def _broadcast(vecs: list[ShapeVec]) -> list[list[Any]] | None:
    """Element lists of equal length (length-1 vectors repeated), or None when they do not broadcast."""
    size = max(len(v.items) for v in vecs)
    if any(len(v.items) not in (1, size) for v in vecs):
        return None
    return [v.items * size if len(v.items) == 1 else v.items for v in vecs]


def _trunc_div(a: Any, b: Any) -> Any:
    """ONNX integer Div truncates toward zero; for (non-negative) symbolic sizes floor division agrees."""
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b > 0) else -q
    return a // b


_ARITH = {
    "Add": operator.add,
    "Sub": operator.sub,
    "Mul": operator.mul,
    "Div": _trunc_div,
    "Mod": operator.mod,  # Mod with fmod=0 takes the divisor's sign, as Python's % does
    "Max": torch.sym_max,
    "Min": torch.sym_min,
}
_LOGIC = {
    "Equal": operator.eq,
    "Less": operator.lt,
    "Greater": operator.gt,
    "LessOrEqual": operator.le,
    "GreaterOrEqual": operator.ge,
    "And": operator.and_,
    "Or": operator.or_,
}


@_shape_rule(*_ARITH, *_LOGIC)
def _elementwise(n: OpCall) -> Any:
    vecs = [_vec(n, i) for i in range(n.n_in)]
    if any(v is None for v in vecs) or (n.op in _ARITH and any(v.dtype == torch.bool for v in vecs)):
        return NotImplemented
    if n.op == "Mod" and n.attr("fmod", 0):
        return NotImplemented
    cols = _broadcast(vecs)
    if cols is None:
        return NotImplemented
    fn = _ARITH.get(n.op) or _LOGIC[n.op]
    items = [
        functools.reduce(fn, xs) if n.op in ("Max", "Min") else fn(*xs) for xs in zip(*cols, strict=False)
    ]
    return ShapeVec(
        items, scalar=all(v.scalar for v in vecs), dtype=torch.int64 if n.op in _ARITH else torch.bool
    )


@_shape_rule("Not")
def _not(n: OpCall) -> Any:
    v = n.raw(0)
    return ShapeVec([torch.sym_not(x) for x in v.items], v.scalar, torch.bool)


@_shape_rule("Where")
def _where(n: OpCall) -> Any:
    vecs = [_vec(n, i) for i in range(3)]
    if any(v is None for v in vecs) or vecs[0].dtype != torch.bool or vecs[1].dtype != vecs[2].dtype:
        return NotImplemented
    cols = _broadcast(vecs)
    if cols is None:
        return NotImplemented
    items = [torch.sym_ite(c, a, b) for c, a, b in zip(*cols, strict=True)]  # no guard on a symbolic c
    return ShapeVec(items, all(v.scalar for v in vecs), vecs[1].dtype)


@_shape_rule("Identity")
def _identity(n: OpCall) -> Any:
    return n.raw(0)


@_shape_rule("Cast")
def _cast(n: OpCall) -> Any:
    v = n.raw(0)
    if n.attr("to") == TensorProto.BOOL:
        return ShapeVec([x != 0 for x in v.items], v.scalar, torch.bool)
    if n.attr("to") in (TensorProto.INT64, TensorProto.INT32):  # symbolic-safe bool -> int
        return ShapeVec([torch.sym_ite(x, 1, 0) for x in v.items], v.scalar) if v.dtype == torch.bool else v
    return NotImplemented


@_shape_rule("Gather")
def _gather(n: OpCall) -> Any:
    data, idx = _vec(n, 0), _vec(n, 1)
    if data is None or idx is None or data.scalar or not all(isinstance(i, int) for i in idx.items):
        return NotImplemented
    return ShapeVec([data.items[i] for i in idx.items], scalar=idx.scalar)


@_shape_rule("Concat")
def _concat(n: OpCall) -> Any:
    parts = [_vec(n, i) for i in range(n.n_in)]
    if any(p is None or p.scalar for p in parts):
        return NotImplemented
    return ShapeVec([s for p in parts for s in p.items])


@_shape_rule("Unsqueeze")
def _unsqueeze(n: OpCall) -> Any:
    v = n.raw(0)
    axes = n.attr("axes") if n.opset < 13 else n.ints(1)
    if not isinstance(v, ShapeVec) or not v.scalar or [norm_axis(a, 1) for a in axes] != [0]:
        return NotImplemented
    return ShapeVec(v.items)


@_shape_rule("Squeeze")
def _squeeze(n: OpCall) -> Any:
    v = n.raw(0)
    if not isinstance(v, ShapeVec) or v.scalar or len(v.items) != 1:
        return NotImplemented
    return ShapeVec(v.items, scalar=True)


@_shape_rule("Slice")
def _slice(n: OpCall) -> Any:
    v = n.raw(0)
    if not isinstance(v, ShapeVec) or v.scalar or n.opset < 10:
        return NotImplemented
    starts, ends, steps = n.ints(1), n.ints(2), n.ints(4) or [1]
    if len(starts) != 1 or (n.ints(3) or [0])[0] not in (0, -1):
        return NotImplemented
    return ShapeVec(v.items[slice(starts[0], ends[0], steps[0])])


@_shape_rule("ReduceProd")
def _reduce_prod(n: OpCall) -> Any:
    v = n.raw(0)
    if (
        not isinstance(v, ShapeVec)
        or v.scalar
        or (n.ints(1) if n.opset >= 18 else n.attr("axes")) not in (None, [0], [-1])
    ):
        return NotImplemented
    prod: Any = 1
    for s in v.items:
        prod = prod * s
    return ShapeVec([prod], scalar=not n.attr("keepdims", 1))


@_shape_rule("Range")
def _range(n: OpCall) -> Any:
    """A Range of static sizes (e.g. the axes [axis, rank) of a normalization) stays a ShapeVec; one
    with a symbolic bound is a tensor (torch.arange follows the symbol)."""
    vecs = [_vec(n, i) for i in range(3)]
    if any(v is None or len(v.items) != 1 or v.dtype == torch.bool for v in vecs):
        return NotImplemented
    start, limit, delta = (v.items[0] for v in vecs)
    if not all(isinstance(b, int) for b in (start, limit, delta)):
        return NotImplemented
    return ShapeVec(list(range(start, limit, delta)))


@_shape_rule("ConstantOfShape")
def _constant_of_shape(n: OpCall) -> Any:
    """A short integer vector filled with one value (e.g. ones appended to a kept-dims shape)."""
    count, value = _vec(n, 0), n.attr("value")
    if (
        count is None
        or len(count.items) != 1
        or not isinstance(count.items[0], int)
        or value is None
        or value.is_floating_point()
    ):
        return NotImplemented
    return ShapeVec([value.reshape(-1)[0].item()] * count.items[0], dtype=value.dtype)


@_shape_rule("Reshape")
def _reshape(n: OpCall) -> Any:
    """A shape vector reshaped to a scalar ([]) or to a vector ([-1] or [its length])."""
    v, target = n.raw(0), n.known_list(1)
    if not isinstance(v, ShapeVec) or target is None:
        return NotImplemented
    if target == [] and len(v.items) == 1:
        return ShapeVec(v.items, scalar=True, dtype=v.dtype)
    if target in ([-1], [len(v.items)]):
        return ShapeVec(v.items, dtype=v.dtype)
    return NotImplemented
