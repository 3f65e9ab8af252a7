"""Shape, indexing, scatter/gather and tensor-construction ops.

Axes may be negative (counted from the end). Indices may be negative in Gather*, Scatter* and
OneHot (counted from the end of the indexed axis).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._dtypes import torch_dtype
from regc.frontend.onnx_import._registry import OpCall, ShapeVec, norm_axis, numel, rule


def _wrap(idx: torch.Tensor, size: Any) -> torch.Tensor:
    """Negative indices count from the end: i < 0 -> i + size."""
    return torch.where(idx < 0, idx + size, idx)


def _axes(n: OpCall, slot: int, since: int, rank: int) -> list[int] | None:
    axes = n.attr("axes") if n.opset < since else n.ints(slot)
    return None if axes is None else [norm_axis(a, rank) for a in axes]


@rule("Shape")
def shape(n: OpCall) -> ShapeVec:
    """The shape as a symbolic vector; opset 15 adds start/end (Python slice semantics)."""
    dims = list(n.x(0).shape)
    return ShapeVec(dims[n.attr("start", 0) : n.attr("end", len(dims))])


@rule("Size")
def size(n: OpCall) -> ShapeVec:
    return ShapeVec([numel(n.x(0).shape)], scalar=True)


@rule("Reshape", consts=(1,))
def reshape(n: OpCall) -> torch.Tensor:
    """0 copies the input's dim (unless allowzero=1), -1 is inferred."""
    x = n.x(0)
    dims = n.ints(1)
    if not n.attr("allowzero", 0):
        dims = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)]
    return torch.reshape(x, dims)


@rule("Flatten")
def flatten(n: OpCall) -> torch.Tensor:
    """[prod(shape[:axis]), prod(shape[axis:])]."""
    x = n.x(0)
    axis = norm_axis(n.attr("axis", 1), x.dim())
    return torch.reshape(x, (numel(x.shape[:axis]), numel(x.shape[axis:])))


@rule("Transpose")
def transpose(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    return x.permute(n.attr("perm") or list(reversed(range(x.dim()))))


@rule("Squeeze", consts=(1,))
def squeeze(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    axes = _axes(n, 1, 13, x.dim())
    return torch.squeeze(x) if axes is None else torch.squeeze(x, tuple(axes))


@rule("Unsqueeze", consts=(1,))
def unsqueeze(n: OpCall) -> torch.Tensor:
    """Axes index the output, so insert in ascending order."""
    x = n.x(0)
    axes = n.attr("axes") if n.opset < 13 else n.ints(1)
    rank = x.dim() + len(axes)
    for a in sorted(norm_axis(a, rank) for a in axes):
        x = torch.unsqueeze(x, a)
    return x


@rule("Concat")
def concat(n: OpCall) -> torch.Tensor:
    return torch.cat(n.xs(), n.attr("axis"))


@rule("Split", consts=(1,))
def split(n: OpCall) -> tuple[torch.Tensor, ...]:
    """Sizes from the ``split`` attribute (< 13) or input; else equal parts, the last one smaller."""
    x = n.x(0)
    axis = norm_axis(n.attr("axis", 0), x.dim())
    sizes = n.attr("split") if n.opset < 13 else n.ints(1)
    if not sizes:
        parts = n.attr("num_outputs", n.n_out)
        dim = x.shape[axis]
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    return tuple(torch.split(x, list(sizes), axis))


def _clamp(v: Any, lo: Any, hi: Any) -> Any:
    return torch.sym_min(torch.sym_max(v, lo), hi)


@rule("Slice", consts=(1, 2, 3, 4))
def slice_(n: OpCall) -> torch.Tensor:
    """numpy slicing per axis; a negative step slices the flipped axis."""
    x = n.x(0)
    if n.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends, axes, steps = n.ints(1), n.ints(2), n.ints(3), n.ints(4)
    axes = [norm_axis(a, x.dim()) for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    for a, start, end, step in zip(axes, starts, ends, steps, strict=False):
        dim = x.shape[a]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = _clamp(start, 0, dim), _clamp(end, 0, dim)
        else:  # mirror onto the flipped axis: i -> dim - 1 - i
            start, end = _clamp(start, 0, dim - 1), _clamp(end, -1, dim - 1)
            x, start, end, step = torch.flip(x, (a,)), dim - 1 - start, dim - 1 - end, -step
        index = [slice(None)] * a + [slice(start, end, step)]
        x = x[tuple(index)]
    return x


@rule("Gather")
def gather(n: OpCall) -> torch.Tensor:
    """out[i..., j..., k...] = data[i..., idx[j...], k...]; a weight table indexed on axis 0 is
    aten.embedding."""
    x, idx = n.x(0), n.x(1)
    axis = norm_axis(n.attr("axis", 0), x.dim())
    idx = _wrap(idx, x.shape[axis])
    if axis == 0 and n.is_param(0) and x.dim() == 2:
        return F.embedding(idx, x)
    if idx.dim() == 0:
        return torch.index_select(x, axis, idx.reshape(1)).squeeze(axis)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


@rule("GatherElements")
def gather_elements(n: OpCall) -> torch.Tensor:
    x, idx = n.x(0), n.x(1)
    axis = norm_axis(n.attr("axis", 0), x.dim())
    return torch.gather(x, axis, _wrap(idx, x.shape[axis]))


@rule("GatherND")
def gather_nd(n: OpCall) -> torch.Tensor:
    """out[b..., i...] = data[b..., idx[b..., i..., :]]: advanced indexing, batch dims by arange."""
    x, idx = n.x(0), n.x(1)
    b = n.attr("batch_dims", 0)
    lead = idx.dim() - 1
    batch = [torch.arange(x.shape[i]).reshape([-1 if d == i else 1 for d in range(lead)]) for i in range(b)]
    return x[tuple(batch + [idx[..., j] for j in range(idx.shape[-1])])]


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@rule("ScatterElements", "Scatter")
def scatter_elements(n: OpCall) -> torch.Tensor:
    x, idx, upd = n.x(0), n.x(1), n.x(2)
    axis = norm_axis(n.attr("axis", 0), x.dim())
    idx = _wrap(idx, x.shape[axis])
    red = n.attr("reduction", "none")
    if red == "none":
        return torch.scatter(x, axis, idx, upd)
    return torch.scatter_reduce(x, axis, idx, upd, _REDUCE[red], include_self=True)


@rule("ScatterND")
def scatter_nd(n: OpCall) -> torch.Tensor:
    """data[idx[i..., :]] (op)= updates[i...]: scatter rows of the data flattened to [prod(k dims), rest]."""
    x, idx, upd = n.x(0), n.x(1), n.x(2)
    k = idx.shape[-1]
    strides = [numel(x.shape[j + 1 : k]) for j in range(k)]
    lin = sum(_wrap(idx[..., j], x.shape[j]) * strides[j] for j in range(k)).reshape(-1, 1)
    flat = x.reshape(numel(x.shape[:k]), -1)
    rows = upd.reshape(lin.shape[0], -1)
    index = lin.expand(rows.shape)
    red = n.attr("reduction", "none")
    if red == "none":
        out = torch.scatter(flat, 0, index, rows)
    else:
        out = torch.scatter_reduce(flat, 0, index, rows, _REDUCE[red], include_self=True)
    return out.reshape(x.shape)


@rule("Expand", consts=(1,))
def expand(n: OpCall) -> torch.Tensor:
    """Bidirectional broadcast of x against ``shape``."""
    x = n.x(0)
    return x.expand(torch.broadcast_shapes(x.shape, tuple(n.ints(1))))


@rule("Tile", consts=(1,))
def tile(n: OpCall) -> torch.Tensor:
    return n.x(0).repeat(n.ints(1))


def _pad_index(size: Any, before: int, after: int, mode: str) -> torch.Tensor:
    """Source index of each padded position along one axis: reflect, edge or wrap."""
    i = torch.arange(-before, size + after)
    if mode == "reflect":
        return (size - 1) - ((size - 1) - i.abs()).abs()
    if mode == "edge":
        return torch.clamp(i, 0, size - 1)
    return torch.remainder(i, size)


@rule("Pad", consts=(1, 3))
def pad(n: OpCall) -> torch.Tensor:
    """pads = [begin_0, begin_1, ..., end_0, end_1, ...] over ``axes`` (all by default)."""
    x = n.x(0)
    mode = n.attr("mode", "constant")
    if n.opset < 11:
        pads, value, axes = n.attr("pads", n.attr("paddings")), n.attr("value", 0.0), None
    else:
        pads, axes = n.ints(1), n.ints(3)
        value = n.x(2)
    axes = [norm_axis(a, x.dim()) for a in (axes or range(x.dim()))]
    half = len(axes)
    if mode == "constant":
        torch_pads: list[Any] = [0, 0] * x.dim()
        for j, a in enumerate(axes):
            torch_pads[2 * (x.dim() - 1 - a)] = pads[j]
            torch_pads[2 * (x.dim() - 1 - a) + 1] = pads[j + half]
        if isinstance(value, torch.Tensor):  # pad with 0 then put the value in the new cells
            zero = F.pad(x, torch_pads)
            inside = F.pad(torch.ones_like(x, dtype=torch.bool), torch_pads)
            return torch.where(inside, zero, value.reshape(()).to(x.dtype))
        return F.pad(x, torch_pads, value=value or 0.0)
    if mode not in ("reflect", "edge", "wrap"):
        raise n.fail(f"mode '{mode}' is not supported")
    for j, a in enumerate(axes):
        if pads[j] or pads[j + half]:
            x = torch.index_select(x, a, _pad_index(x.shape[a], pads[j], pads[j + half], mode))
    return x


@rule("ConstantOfShape", consts=(0,))
def constant_of_shape(n: OpCall) -> torch.Tensor:
    value = n.attr("value")
    if value is None:
        return torch.zeros(n.ints(0))
    return torch.full(n.ints(0), value.reshape(-1)[0].item(), dtype=value.dtype)


@rule("Constant")
def constant(n: OpCall) -> torch.Tensor:
    for key, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if key in n.attrs:
            return torch.tensor(n.attrs[key], dtype=dtype)
    if "value" in n.attrs:
        return n.attrs["value"]
    raise n.fail(f"Constant with attributes {sorted(n.attrs)} is not supported")


@rule("Range", consts=(0, 1, 2))
def range_(n: OpCall) -> torch.Tensor:
    """start, start + delta, ... up to (excluding) limit: max(ceil((limit - start) / delta), 0) values."""
    dtype = n.const(0).dtype if isinstance(n.raw(0), torch.Tensor) else torch.int64
    vals = [n.int(i) for i in range(3)]
    return torch.arange(*vals, dtype=dtype)


@rule("OneHot", consts=(1,))
def one_hot(n: OpCall) -> torch.Tensor:
    """values[1] where (index mod depth for negatives) equals the position on ``axis``, values[0] else."""
    idx, values = n.x(0), n.x(2)
    depth = int(n.floats(1)[0])
    axis = norm_axis(n.attr("axis", -1), idx.dim() + 1)
    idx = _wrap(idx.to(torch.int64), depth).unsqueeze(axis)
    pos = torch.arange(depth).reshape([-1 if d == axis else 1 for d in range(idx.dim())])
    return torch.where(idx == pos, values[1], values[0])


@rule("Trilu", consts=(1,))
def trilu(n: OpCall) -> torch.Tensor:
    k = n.int(1, 0)
    return torch.triu(n.x(0), k) if n.attr("upper", 1) else torch.tril(n.x(0), k)


@rule("EyeLike")
def eye_like(n: OpCall) -> torch.Tensor:
    """1 where column - row == k."""
    x = n.x(0)
    dtype = (
        torch_dtype(n.attr("dtype"), f"dtype of node '{n.name}'") if n.attr("dtype") is not None else x.dtype
    )
    rows, cols = x.shape
    diff = torch.arange(cols).reshape(1, -1) - torch.arange(rows).reshape(-1, 1)
    return (diff == n.attr("k", 0)).to(dtype)


@rule("DepthToSpace")
def depth_to_space(n: OpCall) -> torch.Tensor:
    """DCR: channels split as [b, b, C']; CRD: as [C', b, b] (torch.pixel_shuffle)."""
    x = n.x(0)
    b = n.attr("blocksize")
    N, C, H, W = x.shape
    if n.attr("mode", "DCR") == "DCR":
        y = x.reshape(N, b, b, C // (b * b), H, W).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(N, C // (b * b), b, b, H, W).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(N, C // (b * b), H * b, W * b)


@rule("SpaceToDepth")
def space_to_depth(n: OpCall) -> torch.Tensor:
    """The inverse of DepthToSpace: new channels ordered [b, b, C] (DCR) or [C, b, b] (CRD)."""
    x = n.x(0)
    b = n.attr("blocksize")
    N, C, H, W = x.shape
    perm = (0, 3, 5, 1, 2, 4) if n.attr("mode", "DCR") == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(N, C, H // b, b, W // b, b).permute(perm)
    return y.reshape(N, C * b * b, H // b, W // b)


@rule("TopK", consts=(1,))
def top_k(n: OpCall) -> tuple[torch.Tensor, torch.Tensor]:
    """k largest (or smallest) along ``axis``, ties broken by the lower index (a stable sort)."""
    x = n.x(0)
    k = n.attr("k") if n.opset < 10 else n.int(1)
    axis = norm_axis(n.attr("axis", -1), x.dim())
    values, indices = torch.sort(x, dim=axis, descending=bool(n.attr("largest", 1)), stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


@rule("NonZero")
def non_zero(n: OpCall) -> torch.Tensor:
    return torch.nonzero(n.x(0)).t()


def reverse_sequence(
    x: torch.Tensor, lens: torch.Tensor | None, batch_axis: int, time_axis: int
) -> torch.Tensor:
    """Reverse the first lens[b] steps of each batch entry along the time axis (all steps if no lens)."""
    if lens is None:
        return torch.flip(x, (time_axis,))
    t = torch.arange(x.shape[time_axis])
    lens = lens.reshape(-1, 1).to(torch.int64)
    src = torch.where(t < lens, lens - 1 - t, t)  # [B, T]
    if batch_axis > time_axis:
        src = src.t()
    shape = [x.shape[d] if d in (batch_axis, time_axis) else 1 for d in range(x.dim())]
    return torch.gather(x, time_axis, src.reshape(shape).expand(x.shape))


@rule("ReverseSequence")
def reverse_sequence_op(n: OpCall) -> torch.Tensor:
    return reverse_sequence(n.x(0), n.x(1), n.attr("batch_axis", 1), n.attr("time_axis", 0))


@rule("CenterCropPad", consts=(1,))
def center_crop_pad(n: OpCall) -> torch.Tensor:
    """Crop or zero-pad each of ``axes`` to the target size, centred (the odd cell at the end)."""
    x = n.x(0)
    axes = [norm_axis(a, x.dim()) for a in (n.attr("axes") or range(x.dim()))]
    for a, target in zip(axes, n.ints(1), strict=False):
        diff = target - x.shape[a]
        if diff < 0:
            x = x.narrow(a, -diff // 2, target)
        elif diff > 0:
            pads = [0, 0] * (x.dim() - 1 - a) + [diff // 2, diff - diff // 2]
            x = F.pad(x, pads)
    return x


_WINDOWS = {
    "HannWindow": lambda k, N: 0.5 - 0.5 * torch.cos(2 * torch.pi * k / N),
    "HammingWindow": lambda k, N: 25 / 46 - 21 / 46 * torch.cos(2 * torch.pi * k / N),
    "BlackmanWindow": lambda k, N: (
        0.42 - 0.5 * torch.cos(2 * torch.pi * k / N) + 0.08 * torch.cos(4 * torch.pi * k / N)
    ),
}


@rule(*_WINDOWS, consts=(0,))
def window(n: OpCall) -> torch.Tensor:
    """w[k] for k < size over a period N = size (periodic=1) or size - 1 (symmetric)."""
    size = n.int(0)
    k = torch.arange(size, dtype=torch.float64)
    y = _WINDOWS[n.op](k, size if n.attr("periodic", 1) else size - 1)
    return y.to(torch_dtype(n.attr("output_datatype", 1), f"output_datatype of node '{n.name}'"))


@rule("Compress")
def compress(n: OpCall) -> torch.Tensor:
    """The slices along ``axis`` (of the flattened input when no axis) where ``condition`` is true;
    a condition shorter than the axis leaves the rest out."""
    x, cond = n.x(0), n.x(1)
    axis = n.attr("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis = norm_axis(axis, x.dim())
    keep = torch.nonzero(cond[: x.shape[axis]]).reshape(-1)
    return torch.index_select(x, axis, keep)


@rule("TensorScatter")
def tensor_scatter(n: OpCall) -> torch.Tensor:
    """Write ``update`` into the cache along ``axis`` from write_indices[b] on (mod the cache length
    in circular mode)."""
    cache, update, start = n.x(0), n.x(1), n.x(2)
    axis = norm_axis(n.attr("axis", -2), cache.dim())
    if start is None:
        start = torch.zeros(cache.shape[0], dtype=torch.int64)
    steps = torch.arange(update.shape[axis]).reshape([-1 if d == axis else 1 for d in range(cache.dim())])
    index = start.reshape([-1] + [1] * (cache.dim() - 1)) + steps
    if n.attr("mode", "linear") == "circular":
        index = torch.remainder(index, cache.shape[axis])
    return torch.scatter(cache, axis, index.expand(update.shape), update)
