"""Reading an ONNX file safely: every failure is a typed ``regc`` error that says what to do.

Order matters: the protobuf is parsed without external data, every external-data ``location`` is
checked to stay inside the model's folder (no absolute path, no ``..``, no symlink leading out)
*before* any external file is opened, then the structure is checked with ``onnx.checker``, then the
external data is read, element types are checked and model-local functions are inlined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import onnx
import onnx.external_data_helper as ext
import onnx.inliner
from google.protobuf.message import DecodeError

from regc.errors import ModelFormatError, UnsafePathError
from regc.frontend.onnx_import._dtypes import check_supported

__all__ = ["read_model"]


def read_model(path: str | Path) -> onnx.ModelProto:
    """Parse, check and fully load ``path``; raise ``ModelFormatError`` and its kin otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found; check the path (regc.load takes a .onnx file)")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelFormatError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {e}); the file is truncated, "
            "corrupted or of another format: re-export it"
        ) from e
    if not model.HasField("graph") or model.ir_version < 3:
        raise ModelFormatError(
            f"{path}: parsed as protobuf but holds no ONNX graph (ir_version={model.ir_version}); "
            "the file is truncated or not an ONNX model: re-export it"
        )
    _check_external_locations(model, path)
    try:
        onnx.checker.check_model(str(path))  # by path: external files resolve against the model's folder
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelFormatError(
            f"{path}: not a valid ONNX model: {first}; re-export it or fix the graph"
        ) from e
    try:
        ext.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as e:
        raise ModelFormatError(
            f"{path}: cannot read its external data ({type(e).__name__}: {e}); keep the data files "
            "beside the model, as they were saved"
        ) from e
    check_supported(model, str(path))
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return model


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that would be read from outside the model's folder, or that is missing."""
    root = path.parent.resolve()
    for tensor in _tensors(model.graph):
        if not ext.uses_external_data(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        rel = Path(location)
        inside = (
            bool(location)
            and not rel.is_absolute()
            and ".." not in rel.parts
            and (root / rel).resolve().is_relative_to(root)
        )
        if not inside:
            raise UnsafePathError(
                f"{path}: tensor '{tensor.name}' points its external data at '{location}', outside the "
                f"model's folder {root}; regc only reads data files inside that folder (no absolute paths, "
                "'..' or symlinks leading out): move the data beside the model and re-save it"
            )
        if not (root / rel).is_file():
            raise ModelFormatError(
                f"{path}: tensor '{tensor.name}' keeps its external data in '{location}', which is missing "
                f"from {root}; copy the data files along with the model"
            )


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the graph: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)
