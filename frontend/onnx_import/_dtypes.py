"""ONNX element types <-> torch dtypes, and the rule for which ONNX models torch cannot hold.

torch CPU holds and computes on float16/bfloat16/float32/float64, bool, uint8 and int8/16/32/64.
Everything else is refused up front, from the model's declared types, before any op runs:
string and complex (no torch kernels for most ops), float8/float6/float4 and int4/uint4/int2/uint2
(no torch storage or no arithmetic), uint16/32/64 (storage only; CPU arithmetic kernels are missing).
"""

from __future__ import annotations

from typing import Iterator

import onnx
import torch

from regc.errors import UnsupportedDtypeError

__all__ = ["TORCH_DTYPE", "torch_dtype", "unsupported_types", "check_supported", "type_name"]

_T = onnx.TensorProto
TORCH_DTYPE: dict[int, torch.dtype] = {
    _T.FLOAT: torch.float32,
    _T.DOUBLE: torch.float64,
    _T.FLOAT16: torch.float16,
    _T.BFLOAT16: torch.bfloat16,
    _T.BOOL: torch.bool,
    _T.UINT8: torch.uint8,
    _T.INT8: torch.int8,
    _T.INT16: torch.int16,
    _T.INT32: torch.int32,
    _T.INT64: torch.int64,
}
_DTYPE_ATTRS = ("to", "dtype", "output_dtype")  # int attributes naming an element type


def type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"element type {elem_type}"


def torch_dtype(elem_type: int, where: str) -> torch.dtype:
    """The torch dtype for an ONNX element type; ``UnsupportedDtypeError`` naming ``where`` otherwise."""
    if elem_type not in TORCH_DTYPE:
        raise UnsupportedDtypeError(
            f"{where} has ONNX type {type_name(elem_type)}, which torch cannot hold or compute on "
            f"(supported: {', '.join(type_name(t) for t in TORCH_DTYPE)}); cast the model to one of those"
        )
    return TORCH_DTYPE[elem_type]


def _value_elem_types(tp: onnx.TypeProto) -> Iterator[int]:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(tp, kind).elem_type
    elif kind == "sequence_type":
        yield from _value_elem_types(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        yield from _value_elem_types(tp.optional_type.elem_type)
    elif kind == "map_type":
        yield tp.map_type.key_type
        yield from _value_elem_types(tp.map_type.value_type)


def _graph_types(g: onnx.GraphProto) -> Iterator[tuple[str, int]]:
    for vi in (*g.input, *g.output, *g.value_info):
        for t in _value_elem_types(vi.type):
            yield f"value '{vi.name}'", t
    for init in g.initializer:
        yield f"initializer '{init.name}'", init.data_type
    for node in g.node:
        where = f"node '{node.name or node.op_type}' ({node.op_type})"
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT and a.name in _DTYPE_ATTRS:
                yield f"attribute {a.name} of {where}", a.i
            elif a.type == onnx.AttributeProto.TENSOR:
                yield f"attribute {a.name} of {where}", a.t.data_type
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_types(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graph_types(sub)


def unsupported_types(model: onnx.ModelProto) -> dict[str, str]:
    """Where the model declares an element type torch cannot hold: {location: ONNX type name}."""
    return {
        where: type_name(t)
        for where, t in _graph_types(model.graph)
        if t != _T.UNDEFINED and t not in TORCH_DTYPE
    }


def check_supported(model: onnx.ModelProto, source: str) -> None:
    """Raise ``UnsupportedDtypeError`` listing the first few places with an unsupported type."""
    bad = unsupported_types(model)
    if bad:
        shown = "; ".join(f"{w}: {t}" for w, t in list(bad.items())[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UnsupportedDtypeError(
            f"{source}: uses element types torch cannot hold or compute on: {shown}{more}. "
            "regc imports FLOAT, DOUBLE, FLOAT16, BFLOAT16, BOOL, UINT8 and INT8/16/32/64 tensors"
        )
