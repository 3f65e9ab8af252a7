"""The public entry points: capture, load, compress, lower (thin dispatch to the plug-ins)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from regc.errors import ModelFormatError
from regc.ir import Model
from regc.plugins import loader_for, require, target

__all__ = ["capture", "load", "lower"]


def capture(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            dynamic_shapes: Any = None, **kw: Any) -> Model:
    """Capture a torch module with torch.export (see ``regc.frontend.torch_capture.capture``)."""
    return require("capture")(module, example_inputs, dynamic_shapes, **kw)


def load(path: str | Path, **kw: Any) -> Model:
    """Load a model file (``.onnx``) through regc's own importer."""
    path = str(path)
    if not Path(path).exists():
        raise ModelFormatError(f"{path}: file not found")
    return loader_for(path)(path, **kw)


def lower(model: Model, target_name: str = "x86_64", **options: Any) -> Any:
    """Compile ``model`` for a named target preset (``regc targets`` lists them)."""
    return target(target_name).lower(model, **options)
