"""Capture a torch ``nn.Module`` into a ``regc.Model`` with ``torch.export`` (eval mode, training IR:
linear/conv/batch_norm/sdpa stay whole; no decompositions, which broke GPT-2's attention)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from regc.errors import CaptureError
from regc.ir import Model

__all__ = ["capture"]


def capture(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    dynamic_shapes: Any = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Model:
    """Export ``module`` (put in eval mode) on ``example_inputs`` and wrap the ATen graph.

    ``dynamic_shapes`` is torch.export's spec (e.g. ``{"x": {0: torch.export.Dim("batch")}}``).
    Input names default to ``forward``'s parameter names, output names to ``output`` /
    ``output_0..n``.
    """
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(module).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise CaptureError("example_inputs must be tensors (a tensor or a tuple of tensors)")
    module.eval()
    try:
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {first}. Make the failing code "
            "export-friendly (no data-dependent Python control flow), or export it to ONNX and use regc.load"
        ) from e
    gm = ep.module()
    if input_names is None:
        params = list(inspect.signature(module.forward).parameters)
        input_names = params[: len(args)] if len(params) >= len(args) else [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():
        out = gm(*args)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    if output_names is None:
        output_names = ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]
    if len(output_names) != len(flat):
        raise CaptureError(f"{len(output_names)} output names given, the module returns {len(flat)} tensors")
    state = [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]
    return Model(
        gm=gm,
        input_names=list(input_names),
        output_names=list(output_names),
        example_inputs=args,
        origin="torch",
        param_names={k: k for k in state},
        dynamic_shapes=dynamic_shapes,
    )
