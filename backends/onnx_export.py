"""ONNX export of a ``regc.Model`` with torch's dynamo exporter.

Input/output names, dynamic dims and opset come from the model; the result is checked by
onnxruntime loading it (an artifact that does not load is an error, not a file on disk).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from regc.errors import LoweringError
from regc.ir import Model

__all__ = ["export_onnx", "OPSET"]

OPSET = 18


def export_onnx(model: Model, path: str, *, opset: int = OPSET) -> None:
    """Write ``model`` as one self-contained ONNX file at ``path`` (weights inline, < 2 GB)."""
    path = Path(path)
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model.gm,
                model.example_inputs,
                dynamo=True,
                input_names=list(model.input_names),
                output_names=list(model.output_names),
                dynamic_shapes=model.dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoweringError(f"ONNX export failed: {first}") from e
    proto = prog.model_proto
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False)
    tmp.close()
    try:
        onnx.save_model(proto, tmp.name)
        os.replace(tmp.name, path)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)


class _quiet:
    """Silence the exporter's progress prints on stdout (they would corrupt ``--json`` output)."""

    def __enter__(self):
        import contextlib
        import io

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
