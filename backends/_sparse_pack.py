"""Packed storage of sparse weights in an exported ONNX graph (values + 1-bit mask).

A weight W with n elements, of which z are non-zero, is stored as two initializers:

    v in R^z        the non-zeros in row-major order
    b in {0,1}^n    b_i = [W_i != 0], packed 8 per uint8 byte, element 8k+j in bit j of byte k

and rebuilt inside the graph by standard ONNX ops:

    b_i   = (byte_{i // 8} >> (i mod 8)) & 1                      (BitShift, BitwiseAnd, Reshape, Slice)
    p_i   = b_i * sum_{j <= i} b_j                                 (CumSum, Mul): 1-based slot, 0 if pruned
    W_i   = [0, v_1, ..., v_z][p_i]                                (Concat, Gather, Reshape)

The round trip is exact (the bits come from W != 0, not from the pruning mask). Bytes go from
n * s (s = bytes per element) to z * s + ceil(n / 8). This is storage compression only: onnxruntime
may fold the decode to the dense constant at session load, and the dense kernels run unchanged.

Only initializers whose tensor ``model.annotations`` marks sparse (a ``mask`` and ``sparsity`` of at
least `MIN_SPARSITY`) are packed, and only when the packed form is smaller.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from regc.ir import Model

__all__ = ["pack_sparse_initializers", "MIN_SPARSITY"]

MIN_SPARSITY = 0.3
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
_SHARED = {  # constants every decoder uses, stored once
    "regc_sparse_shifts": np.arange(8, dtype=np.uint8), "regc_sparse_one": np.array(1, np.uint8),
    "regc_sparse_axis0": np.array(0, np.int64), "regc_sparse_col": np.array([-1, 1], np.int64),
    "regc_sparse_flat": np.array([-1], np.int64), "regc_sparse_start": np.array([0], np.int64),
}


def pack_sparse_initializers(proto: onnx.ModelProto, model: Model) -> dict:
    """Replace each sparse-annotated float initializer of ``proto`` by its packed form and decode nodes.

    Returns storage stats: per packed initializer its dense and packed bytes, and the totals.
    """
    graph = proto.graph
    wanted = _Wanted(_sparse_tensors(model))
    if not wanted.tensors:
        return {}
    inputs = {i.name for i in graph.input}
    decode, layers, dtypes = [], {}, set()
    for init in list(graph.initializer):
        if init.data_type not in _FLOATS or init.name in inputs:
            continue
        arr = numpy_helper.to_array(init)
        if not wanted.holds(init.name, arr):
            continue
        flat = arr.reshape(-1)
        bits = flat != 0
        values = flat[bits]
        packed = values.nbytes + math.ceil(flat.size / 8)
        if values.size == 0 or packed >= arr.nbytes:
            continue
        graph.initializer.remove(init)
        dtypes.add(values.dtype)
        decode += _decode_nodes(graph, init.name, values, np.packbits(bits, bitorder="little"), arr.shape)
        layers[init.name] = {"bytes_dense": int(arr.nbytes), "bytes_packed": int(packed),
                             "nonzero": int(values.size), "numel": int(flat.size)}
    if not layers:
        return {}
    graph.initializer.extend([numpy_helper.from_array(v, k) for k, v in _SHARED.items()])
    graph.initializer.extend([numpy_helper.from_array(np.zeros(1, d), f"regc_sparse_zero_{d}")
                              for d in dtypes])
    nodes = decode + list(graph.node)  # decoders first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    dense = sum(v["bytes_dense"] for v in layers.values())
    packed = sum(v["bytes_packed"] for v in layers.values())
    return {"layers": layers, "bytes_dense": dense, "bytes_packed": packed,
            "compression": round(dense / packed, 3),
            "format": "non-zero values + 1-bit mask, decoded by standard ONNX ops",
            "note": "storage only: the decode may be folded at load, kernels stay dense"}


def _sparse_tensors(model: Model) -> list[tuple[str, np.ndarray]]:
    out = []
    for target, ann in model.annotations.items():
        if "mask" in ann and ann.get("sparsity", 0.0) >= MIN_SPARSITY:
            try:
                out.append((target, model.get_tensor(target).detach().cpu().numpy()))
            except AttributeError:  # a target the graph no longer holds
                continue
    return out


class _Wanted:
    """The annotated tensors, found by name or (renamed by the exporter) by contents: a hash of the bytes
    per dtype, so matching n initializers costs O(n) hashes instead of n x m array comparisons."""

    def __init__(self, tensors: list[tuple[str, np.ndarray]]):
        self.tensors = tensors
        self.names = {target for target, _ in tensors}
        self.digests: dict[np.dtype, set[tuple]] = {}

    def holds(self, name: str, arr: np.ndarray) -> bool:
        if name in self.names:
            return True
        if arr.dtype not in self.digests:
            self.digests[arr.dtype] = {_digest(w.astype(arr.dtype)) for _, w in self.tensors}
        return _digest(arr) in self.digests[arr.dtype]


def _digest(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()


def _decode_nodes(graph: onnx.GraphProto, name: str, values: np.ndarray, packed: np.ndarray,
                  shape: tuple[int, ...]) -> list[onnx.NodeProto]:
    n = int(np.prod(shape))
    p = lambda s: f"{name}__{s}"  # noqa: E731
    graph.initializer.extend([
        numpy_helper.from_array(values, p("nz")),
        numpy_helper.from_array(packed, p("bits")),
        numpy_helper.from_array(np.array([n], np.int64), p("stop")),
        numpy_helper.from_array(np.array(shape, np.int64), p("shape")),
    ])
    mk = helper.make_node
    return [
        mk("Reshape", [p("bits"), "regc_sparse_col"], [p("bytes")]),
        mk("BitShift", [p("bytes"), "regc_sparse_shifts"], [p("shifted")], direction="RIGHT"),
        mk("BitwiseAnd", [p("shifted"), "regc_sparse_one"], [p("bit8")]),
        mk("Reshape", [p("bit8"), "regc_sparse_flat"], [p("bitpad")]),
        mk("Slice", [p("bitpad"), "regc_sparse_start", p("stop")], [p("bit")]),
        mk("Cast", [p("bit")], [p("bit64")], to=TensorProto.INT64),
        mk("CumSum", [p("bit64"), "regc_sparse_axis0"], [p("rank")]),
        mk("Mul", [p("rank"), p("bit64")], [p("slot")]),
        mk("Concat", [f"regc_sparse_zero_{values.dtype}", p("nz")], [p("table")], axis=0),
        mk("Gather", [p("table"), p("slot")], [p("dense")], axis=0),
        mk("Reshape", [p("dense"), p("shape")], [name]),
    ]
