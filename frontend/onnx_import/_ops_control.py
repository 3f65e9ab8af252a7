"""Control flow, unrolled at import: If takes the branch its (known) condition selects, Loop runs its
body for a known trip count / while a known condition holds, Scan runs its body once per slice of the
scan inputs (a static length). Bodies see the enclosing graph's values.
"""

from __future__ import annotations

from typing import Any

import torch

from regc.frontend.onnx_import._registry import OpCall, ShapeVec, norm_axis, rule

_MAX_ITERATIONS = 100_000


@rule("If", consts=(0,))
def if_(n: OpCall) -> tuple[Any, ...]:
    taken = bool(n.ints(0)[0])
    return tuple(n.run_graph(n.attr("then_branch" if taken else "else_branch"), []))


def _known_flag(n: OpCall, v: Any) -> bool:
    if isinstance(v, ShapeVec) and all(isinstance(i, (int, bool)) for i in v.items):
        return bool(v.items[0])
    raise n.fail(
        "the loop condition is computed from tensor data; only loops with a known trip count or "
        "a condition computed from shapes can be unrolled"
    )


@rule("Loop", consts=(0, 1))
def loop(n: OpCall) -> tuple[Any, ...]:
    """body(i, cond, v...) -> (cond, v..., scan...); scan outputs are stacked along a new axis 0."""
    trip = n.int(0) if n.has(0) else None
    cond = bool(n.int(1)) if n.has(1) else True
    carried = [n.raw(i) for i in range(2, n.n_in)]
    body = n.attr("body")
    scans: list[list[Any]] = []
    i = 0
    while cond and (trip is None or i < trip):
        if i >= _MAX_ITERATIONS:
            raise n.fail(f"more than {_MAX_ITERATIONS} iterations")
        outs = n.run_graph(body, [ShapeVec([i], scalar=True), ShapeVec([cond], True, torch.bool), *carried])
        cond = _known_flag(n, outs[0])
        carried = outs[1 : 1 + len(carried)]
        scans.append(outs[1 + len(carried) :])
        i += 1
    if not scans and n.n_out > len(carried):
        raise n.fail("scan outputs of a loop that runs zero times")
    stacked = [torch.stack([_tensor(s[k]) for s in scans]) for k in range(n.n_out - len(carried))]
    return (*carried, *stacked)


def _tensor(v: Any) -> torch.Tensor:
    return v.tensor() if isinstance(v, ShapeVec) else v


@rule("Scan")
def scan(n: OpCall) -> tuple[Any, ...]:
    """body(state..., x_t...) -> (state..., y_t...) over t along each scan input's axis (reversed where
    its direction is 1); the y_t are stacked along the output axes."""
    if n.opset < 9:
        raise n.fail("Scan-8 (batched, with sequence_lens) is not supported")
    m = n.attr("num_scan_inputs")
    inputs = [n.x(i) for i in range(n.n_in)]
    states, xs = inputs[: len(inputs) - m], inputs[len(inputs) - m :]
    in_axes = [norm_axis(a, x.dim()) for a, x in zip(n.attr("scan_input_axes") or [0] * m, xs, strict=False)]
    in_dirs = n.attr("scan_input_directions") or [0] * m
    length = xs[0].shape[in_axes[0]]
    body = n.attr("body")
    k = len(body.outputs) - len(states)
    collected: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for t in range(length):
        slices = [
            x.select(a, length - 1 - t if d else t) for x, a, d in zip(xs, in_axes, in_dirs, strict=False)
        ]
        outs = n.run_graph(body, [*states, *slices])
        states = outs[: len(states)]
        for j, y in enumerate(outs[len(states) :]):
            collected[j].append(_tensor(y))
    out_axes = n.attr("scan_output_axes") or [0] * k
    out_dirs = n.attr("scan_output_directions") or [0] * k
    ys = [
        torch.stack(c[::-1] if d else c, norm_axis(a, c[0].dim() + 1))
        for c, a, d in zip(collected, out_axes, out_dirs, strict=False)
    ]
    return (*states, *ys)
