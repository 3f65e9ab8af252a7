"""ONNX export of a ``regc.Model`` with torch's dynamo exporter.

Input/output names, dynamic dims and opset come from the model; the result is checked by
onnxruntime loading it (an artifact that does not load is an error, not a file on disk).
Weights that ``issp`` made sparse are stored packed (non-zeros + bitmask, see `_sparse_pack`).

Exact GELU is written in the operand order onnxruntime fuses into one ``Gelu`` kernel,
``(x * (1 + erf(x / sqrt(2)))) * 0.5``; torch's own translation writes ``x * (0.5 * (1 + erf(..)))``, the same
values (x 0.5 is exact) in an order onnxruntime does not match, which leaves five elementwise kernels
per GELU.
(The tanh form is written plainly: onnxruntime 1.32's CPU graph fuses none of the orders tried.)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnxscript import opset18 as op

from regc.backends._sparse_pack import pack_sparse_initializers
from regc.errors import LoweringError
from regc.ir import Model
from regc.plugins import onnx_translations, register_onnx_translation

__all__ = ["export_onnx", "OPSET"]

OPSET = 18


def export_onnx(model: Model, path: str, *, opset: int = OPSET) -> dict:
    """Write ``model`` as one self-contained ONNX file at ``path`` (weights inline, < 2 GB).

    Returns the sparse storage stats (empty when no weight was packed); they are also written to the
    file's ``metadata_props`` under ``regc.sparse_storage``.
    """
    path = Path(path)
    table, functions = onnx_translations()
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model.gm,
                model.example_inputs,
                dynamo=True,
                input_names=list(model.input_names),
                output_names=list(model.output_names),
                dynamic_shapes=model.export_dynamic_shapes(),
                opset_version=opset,
                verbose=False,
                custom_translation_table=table or None,
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoweringError(f"ONNX export failed: {first}") from e
    proto = prog.model_proto
    _attach_functions(proto, functions)
    storage = pack_sparse_initializers(proto, model)
    if storage:
        proto.metadata_props.add(key="regc.sparse_storage", value=json.dumps(storage))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False)
    tmp.close()
    try:
        onnx.save_model(proto, tmp.name)
        os.replace(tmp.name, path)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return storage


def _gelu_onnx(x, approximate: str = "none"):
    if approximate == "tanh":
        inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), 0.044715)), 0.7978845608028654)
        return op.Mul(op.Mul(x, op.Add(op.Tanh(inner), 1.0)), 0.5)
    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, 1.4142135623730951)), 1.0)), 0.5)


register_onnx_translation(torch.ops.aten.gelu.default, _gelu_onnx)


def _attach_functions(proto: onnx.ModelProto, functions: dict) -> None:
    """Give each custom-domain op the graph uses its registered function body, so onnxruntime runs it."""
    used = {(n.domain, n.op_type) for n in proto.graph.node} - {(f.domain, f.name) for f in proto.functions}
    for key in sorted(used & set(functions)):
        proto.functions.append(functions[key])
        if all(o.domain != key[0] for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(key[0], 1))


class _quiet:
    """Silence the exporter's progress prints on stdout (they would corrupt ``--json`` output)."""

    def __enter__(self):
        import contextlib
        import io
        import logging

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        self._ctx.__enter__()
        self._log = logging.getLogger("torch.onnx")  # "torchvision is not installed" warnings
        self._level = self._log.level
        self._log.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._log.setLevel(self._level)
        self._ctx.__exit__(*exc)
