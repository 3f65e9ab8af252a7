"""The op rule table and what a rule sees of its node.

A rule turns one ONNX node into torch calls. It is registered for one or more op types with

    @rule("Tile", consts=(1,))             # slot 1 (the repeats) must be known at import time
    def tile(n: OpCall) -> torch.Tensor:
        return n.x(0).repeat(n.ints(1))

``consts`` lists the input slots that set shapes, axes, counts or sizes (Reshape's shape, Slice's
starts, TopK's k, ...). torch.export needs them as Python values, so they must be initializers,
Constant outputs, values folded from those, shapes of tensors (``ShapeVec``), or graph inputs that the
caller folds with ``load_onnx(path, constant_inputs={...})``. ``states`` lists float slots that are
statistics, not weights (BatchNormalization's running mean and variance): held as buffers.
``prepare`` may re-lay a float initializer once at import before it becomes that slot's parameter
(Gemm stores ``B`` as the ``[out, in]`` weight of ``aten.linear``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
import torch

from regc.errors import UnsupportedOpError
from regc.frontend.onnx_import._dtypes import torch_dtype

__all__ = [
    "Rule",
    "RULES",
    "rule",
    "OpCall",
    "ShapeVec",
    "Subgraph",
    "free_names",
    "parse_attrs",
    "tensor_from_proto",
    "tensor_from_numpy",
]


@dataclasses.dataclass(frozen=True)
class Rule:
    fn: Callable[["OpCall"], Any]
    consts: tuple[int, ...] = ()
    states: tuple[int, ...] = ()
    prepare: Callable[[dict[str, Any], int, torch.Tensor], torch.Tensor] | None = None
    pure: bool = True  # deterministic: may be folded at import when all inputs are known


RULES: dict[str, Rule] = {}


def rule(
    *op_types: str,
    consts: Sequence[int] = (),
    states: Sequence[int] = (),
    prepare: Callable[[dict[str, Any], int, torch.Tensor], torch.Tensor] | None = None,
    pure: bool = True,
) -> Callable[[Callable[["OpCall"], Any]], Callable[["OpCall"], Any]]:
    def register(fn: Callable[["OpCall"], Any]) -> Callable[["OpCall"], Any]:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"ONNX op '{op}' has two rules")
            RULES[op] = Rule(fn, tuple(consts), tuple(states), prepare, pure)
        return fn

    return register


def tensor_from_proto(t: onnx.TensorProto, where: str) -> torch.Tensor:
    return tensor_from_numpy(onnx.numpy_helper.to_array(t)).to(torch_dtype(t.data_type, where))


def tensor_from_numpy(arr: Any) -> torch.Tensor:
    """A torch copy of a numpy array, bfloat16 (numpy's ml_dtypes.bfloat16) included."""
    arr = np.asarray(arr)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(arr.copy())


class ShapeVec:
    """A small int64 tensor (0-d or 1-d) whose elements may be symbolic sizes (``torch.SymInt``).

    ``Shape`` produces one; shape arithmetic (Gather, Concat, Slice, Add, ...) keeps it symbolic so
    ``Reshape``/``Expand`` receive sizes that torch.export can follow, never a data-dependent tensor.
    """

    __slots__ = ("items", "scalar", "dtype")

    def __init__(self, items: Sequence[Any], scalar: bool = False, dtype: torch.dtype = torch.int64):
        self.items = list(items)
        self.scalar = scalar
        self.dtype = dtype  # int64, or bool for comparisons

    def tensor(self) -> torch.Tensor:
        if all(isinstance(i, (int, bool)) for i in self.items):
            t = torch.tensor(self.items, dtype=self.dtype)
        else:
            t = torch.stack([torch.ops.aten.scalar_tensor.default(i, dtype=self.dtype) for i in self.items])
        return t.reshape(()) if self.scalar else t


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values, torch tensors and ``Subgraph``s. Parse before tracing:
    under torch.export's fake mode a tensor made from an attribute would lose its values."""
    name = node.name or (node.output[0] if node.output else node.op_type)
    return {a.name: _attr_value(a, f"attribute {a.name} of node '{name}'") for a in node.attribute}


@dataclasses.dataclass(frozen=True)
class Subgraph:
    """A parsed graph attribute (If branch, Loop/Scan body)."""

    inputs: list[str]
    outputs: list[str]
    nodes: list[tuple[onnx.NodeProto, dict[str, Any]]]
    initializers: dict[str, torch.Tensor]
    free: frozenset[str]  # names it reads from the enclosing graphs

    @classmethod
    def parse(cls, g: onnx.GraphProto) -> "Subgraph":
        nodes = [(node, parse_attrs(node)) for node in g.node]
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        used: set[str] = set()
        for node, attrs in nodes:
            used.update(n for n in node.input if n)
            used.update(free_names(attrs))
            defined.update(node.output)
        used.update(o.name for o in g.output)
        return cls(
            [i.name for i in g.input],
            [o.name for o in g.output],
            nodes,
            {t.name: tensor_from_proto(t, f"initializer '{t.name}'") for t in g.initializer},
            frozenset(used - defined),
        )


def free_names(attrs: dict[str, Any]) -> set[str]:
    """Names the subgraphs among a node's parsed attributes read from outside."""
    found: set[str] = set()
    for value in attrs.values():
        for sub in value if isinstance(value, list) else [value]:
            if isinstance(sub, Subgraph):
                found |= sub.free
    return found


def _attr_value(a: onnx.AttributeProto, where: str) -> Any:
    if a.type == onnx.AttributeProto.TENSOR:
        return tensor_from_proto(a.t, where)
    if a.type == onnx.AttributeProto.GRAPH:
        return Subgraph.parse(a.g)
    if a.type == onnx.AttributeProto.GRAPHS:
        return [Subgraph.parse(g) for g in a.graphs]
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [s.decode() for s in v]
    return v


class OpCall:
    """One ONNX node being turned into torch calls: its attributes and its input values.

    Input values are tensors (traced or known), ``ShapeVec``s, or None for an omitted optional input.
    """

    def __init__(
        self,
        node: onnx.NodeProto,
        attrs: dict[str, Any],
        opset: int,
        values: Sequence[Any],
        known: Sequence[torch.Tensor | None],
        known_lists: Sequence[list[Any] | None],
        params: Sequence[bool],
        subgraph: Callable[["Subgraph", list[Any]], list[Any]],
    ):
        self.node = node
        self.op = node.op_type
        self.name = node.name or (node.output[0] if node.output else node.op_type)
        self.opset = opset
        self._values = list(values)
        self._known = list(known)  # per slot: the value known at import time, or None
        self._lists = list(known_lists)  # per slot: that value as a flat Python list (small tensors)
        self._params = list(params)
        self._subgraph = subgraph
        self.attrs = attrs

    # ---- attributes ----------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    # ---- inputs --------------------------------------------------------------------------------
    @property
    def n_in(self) -> int:
        return len(self._values)

    @property
    def n_out(self) -> int:
        return len(self.node.output)

    def has(self, i: int) -> bool:
        return i < len(self._values) and self._values[i] is not None

    def is_param(self, i: int) -> bool:
        """Slot ``i`` reads a trainable initializer (after ``Rule.prepare``)."""
        return i < len(self._params) and self._params[i]

    def raw(self, i: int) -> Any:
        return self._values[i] if self.has(i) else None

    def x(self, i: int) -> torch.Tensor | None:
        """Input ``i`` as a tensor (None when omitted)."""
        v = self.raw(i)
        return v.tensor() if isinstance(v, ShapeVec) else v

    def xs(self) -> list[torch.Tensor]:
        return [self.x(i) for i in range(self.n_in) if self.has(i)]

    def known_list(self, i: int) -> list[Any] | None:
        """Input ``i`` as a flat list when it is a small tensor known at import time."""
        return self._lists[i] if i < len(self._lists) else None

    def ints(self, i: int) -> list[Any] | None:
        """Input ``i`` as a list of ints (or symbolic sizes); None when omitted."""
        if not self.has(i):
            return None
        if self.known_list(i) is not None:
            return self.known_list(i)
        v = self._values[i]
        if isinstance(v, ShapeVec):
            return list(v.items)
        raise self.needs_constant(i)

    def int(self, i: int, default: Any = None) -> Any:
        vals = self.ints(i)
        if vals is None:
            return default
        if len(vals) != 1:
            raise self.fail(f"input {i} must hold one value, got {len(vals)}")
        return vals[0]

    def const(self, i: int) -> torch.Tensor | None:
        """Input ``i`` as a tensor known at import time (None when omitted)."""
        if not self.has(i):
            return None
        v = self._values[i]
        if isinstance(v, ShapeVec) and all(isinstance(s, (int, bool)) for s in v.items):
            return v.tensor()
        if i < len(self._known) and self._known[i] is not None:
            return self._known[i]
        raise self.needs_constant(i)

    def floats(self, i: int) -> list[float] | None:
        """Input ``i`` as a list of floats known at import time; None when omitted."""
        if not self.has(i):
            return None
        vals = self.known_list(i)
        return [float(v) for v in (vals if vals is not None else self.const(i).reshape(-1).tolist())]

    def run_graph(self, graph: "Subgraph", args: Sequence[Any]) -> list[Any]:
        """Run a subgraph (If branch, Loop/Scan body) on ``args``; it also sees the enclosing values."""
        return self._subgraph(graph, list(args))

    # ---- errors --------------------------------------------------------------------------------
    def fail(self, what: str) -> UnsupportedOpError:
        """An ``UnsupportedOpError`` naming this node; ``raise n.fail("...")``."""
        return UnsupportedOpError(
            f"node '{self.name}' ({self.op}, opset {self.opset}): {what}; regc cannot import this node "
            "as is (rewrite the model without it, or file an issue with the model)",
            op=self.op,
        )

    def needs_constant(self, i: int) -> UnsupportedOpError:
        name = self.node.input[i]
        return UnsupportedOpError(
            f"node '{self.name}' ({self.op}, opset {self.opset}): input {i} '{name}' sets a shape, axis or "
            "count and must be known at import time, but it is computed from tensor data; if it is a graph "
            f"input, fold it: load_onnx(path, constant_inputs={{'{name}': value}})",
            op=self.op,
        )


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def numel(dims: Sequence[Any]) -> Any:
    return math.prod(dims)
