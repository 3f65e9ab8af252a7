"""ONNX graph -> torch module whose ``forward`` runs the rule table; torch.export turns it into FX.

``OnnxModule`` plans the graph once at import:

- float initializers become ``nn.Parameter``s, one copy per consuming node (the dynamo exporter
  de-duplicates equal initializers, so sharing in the file says nothing about tying in the model);
  float initializers in ``Rule.states`` slots (BatchNorm statistics) and all other initializers
  become buffers;
- nodes whose inputs are all known at import (integer initializers, Constant outputs, folded values,
  ``constant_inputs``) and that are deterministic are evaluated right away (constant folding);
- every other node becomes a step of ``forward``.

``forward`` is then traced by torch.export, which records the torch calls the rules make as canonical
ATen ops (``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``, ...) and follows symbolic sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import onnx
import torch

from regc.errors import CaptureError, RegcError, UnsupportedOpError
from regc.frontend.onnx_import._registry import (
    RULES,
    OpCall,
    Rule,
    ShapeVec,
    Subgraph,
    free_names,
    parse_attrs,
    tensor_from_proto,
)
from regc.frontend.onnx_import._shapevec import SHAPE_RULES

__all__ = ["OnnxModule", "default_opset", "constant_slots"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_LIST_LIMIT = 64  # known tensors up to this size are also kept as Python lists (shapes, scales, ...)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return imp.version
    return 1


def _rule_for(node: onnx.NodeProto, opset: int) -> Rule:
    if node.domain not in _DEFAULT_DOMAINS or node.op_type not in RULES:
        domain = node.domain or "ai.onnx"
        raise UnsupportedOpError(
            f"node '{node.name or node.output[0]}' uses op '{node.op_type}' "
            f"(domain '{domain}', opset {opset}), "
            "which regc does not import; regc.frontend.onnx_import.supported_ops() lists the ops it does",
            op=node.op_type,
        )
    return RULES[node.op_type]


def constant_slots(model: onnx.ModelProto) -> dict[str, str]:
    """Graph inputs whose values set shapes, axes or counts: {input name: 'Op input slot'}.

    A value is needed at import when an op reads it in a ``Rule.consts`` slot, or when it feeds (other
    than through Shape/Size, which read only sizes) an op whose output is needed; subgraphs included
    (names are unique across a model and its subgraphs)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - inits
    needed: dict[str, str] = {}
    _mark_needed(model.graph, default_opset(model), needed)
    return {name: why for name, why in needed.items() if name in inputs}


def _mark_needed(graph: onnx.GraphProto, opset: int, needed: dict[str, str]) -> None:
    for node in reversed(graph.node):
        r = _rule_for(node, opset)
        reason = next((needed[o] for o in node.output if o in needed), None)
        slots = range(len(node.input)) if reason and node.op_type not in ("Shape", "Size") else r.consts
        for i in slots:
            if i < len(node.input) and node.input[i]:
                needed.setdefault(node.input[i], reason or f"{node.op_type} input {i}")
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                if reason:
                    needed.update((o.name, reason) for o in sub.output if o.name not in needed)
                _mark_needed(sub, opset, needed)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a node input comes from: "env" (computed in forward), "known" (an import-time value),
    "param" or "buffer" (the module attribute ``target``; a buffer's value is also known)."""

    kind: str
    name: str  # the ONNX value
    target: str = ""


@dataclasses.dataclass(frozen=True)
class _Step:
    node: onnx.NodeProto
    attrs: dict[str, Any]
    rule: Rule
    slots: tuple[_Slot | None, ...]


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch calls. Parameters and buffers are attributes of this module."""

    def __init__(self, model: onnx.ModelProto, constant_inputs: dict[str, torch.Tensor]):
        super().__init__()
        g = model.graph
        self.opset = default_opset(model)
        inits = {t.name: tensor_from_proto(t, f"initializer '{t.name}'") for t in g.initializer}
        self._trainable = {n for n, v in inits.items() if v.is_floating_point()}
        self._initializers = set(inits)
        self.known: dict[str, torch.Tensor] = {}
        self._lists: dict[str, list[Any] | None] = {}  # small known tensors as lists, made before tracing
        for name, value in {**inits, **constant_inputs}.items():
            self._remember(name, value)
        self.input_names = [i.name for i in g.input if i.name not in self.known]
        self.output_names = [o.name for o in g.output]
        self.param_names: dict[str, str] = {}  # attribute target -> ONNX initializer name
        self._buffer_of: dict[str, str] = {}  # initializer -> buffer target
        self._steps: list[_Step] = []
        rules = [(node, _rule_for(node, self.opset)) for node in g.node]  # refuse unknown ops first
        for node, r in rules:
            self._plan(node, r)

    # ---- planning ------------------------------------------------------------------------------
    def _plan(self, node: onnx.NodeProto, r: Rule) -> None:
        attrs = parse_attrs(node)
        if self._fold(node, attrs, r):
            return
        self._fold_subgraphs(attrs)
        slots: list[_Slot | None] = []
        own: dict[str, str] = {}  # this node's copies of float initializers
        for i, n in enumerate(node.input):
            if not n:
                slots.append(None)
            elif n in self._trainable and i not in r.consts and i not in r.states:
                if n not in own:
                    own[n] = self._param(attrs, r, i, n)
                slots.append(_Slot("param", n, own[n]))
            elif n in self._initializers and i not in r.consts:
                slots.append(_Slot("buffer", n, self._buffer(n)))
            else:
                slots.append(_Slot("known" if n in self.known else "env", n))
        self._steps.append(_Step(node, attrs, r, tuple(slots)))

    def _remember(self, name: str, value: torch.Tensor) -> None:
        self.known[name] = value
        self._lists[name] = _as_list(value)

    def _fold(self, node: onnx.NodeProto, attrs: dict[str, Any], r: Rule) -> bool:
        """Evaluate a deterministic node whose inputs are all known now; False when it is not."""
        names = list(node.input)
        if (
            not r.pure
            or not all(
                not n or (n in self.known and (i in r.consts or n not in self._trainable))
                for i, n in enumerate(names)
            )
            or not free_names(attrs) <= self.known.keys()
        ):
            return False
        values = [self.known[n] if n else None for n in names]
        lists = [self._lists[n] if n else None for n in names]
        outs = self._apply(node, attrs, r, values, values, lists, [False] * len(names), {})
        for name, v in zip(node.output, outs, strict=False):
            if name and v is not None:
                self._remember(name, v.tensor() if isinstance(v, ShapeVec) else v)
        return True

    def _fold_subgraphs(self, attrs: dict[str, Any]) -> None:
        """Make subgraph initializers known and fold the subgraph nodes that depend on nothing else
        (names are unique across a model and its subgraphs)."""
        for value in attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, Subgraph):
                    for name, tensor in sub.initializers.items():
                        self._remember(name, tensor)
                    for node, node_attrs in sub.nodes:
                        if not self._fold(node, node_attrs, _rule_for(node, self.opset)):
                            self._fold_subgraphs(node_attrs)

    def _param(self, attrs: dict[str, Any], r: Rule, slot: int, name: str) -> str:
        value = self.known[name] if r.prepare is None else r.prepare(attrs, slot, self.known[name])
        target = self._new_target(name)
        self.register_parameter(target, torch.nn.Parameter(value.clone()))
        self.param_names[target] = name
        return target

    def _buffer(self, name: str) -> str:
        if name not in self._buffer_of:
            target = self._new_target(name)
            self.register_buffer(target, self.known[name].clone())
            self.param_names[target] = name
            self._buffer_of[name] = target
        return self._buffer_of[name]

    def _new_target(self, name: str) -> str:
        base = re.sub(r"\W", "_", name)
        base = base if base and not base[0].isdigit() else f"_{base}"
        target, k = base, 0
        while hasattr(self, target) or target in self.param_names:
            k += 1
            target = f"{base}_{k}"
        return target

    # ---- running -------------------------------------------------------------------------------
    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[str, Any] = dict(zip(self.input_names, args, strict=False))
        for step in self._steps:
            values, known, lists, params = [], [], [], []
            for s in step.slots:
                is_known = s is not None and s.kind in ("known", "buffer")
                values.append(None if s is None else self._value(s, env))
                known.append(self.known[s.name] if is_known else None)
                lists.append(self._lists[s.name] if is_known else None)
                params.append(s is not None and s.kind == "param")
            outs = self._apply(step.node, step.attrs, step.rule, values, known, lists, params, env)
            env.update((name, v) for name, v in zip(step.node.output, outs, strict=False) if name)
        return tuple(self._output(name, env) for name in self.output_names)

    def _run_graph(self, outer: dict[str, Any], graph: Subgraph, args: list[Any]) -> list[Any]:
        """Run a subgraph in the scope of ``outer``; nodes folded at import are skipped."""
        env = dict(outer)
        env.update(zip(graph.inputs, args, strict=False))
        for node, attrs in graph.nodes:
            if all(name in self.known for name in node.output if name):
                continue
            known = [self.known.get(name) if name and name not in env else None for name in node.input]
            values = [
                None if not name else (env[name] if name in env else k)
                for name, k in zip(node.input, known, strict=False)
            ]
            lists = [
                self._lists.get(name) if k is not None else None
                for name, k in zip(node.input, known, strict=False)
            ]
            outs = self._apply(
                node, attrs, _rule_for(node, self.opset), values, known, lists, [False] * len(values), env
            )
            env.update((name, v) for name, v in zip(node.output, outs, strict=False) if name)
        return [env[name] if name in env else self.known[name] for name in graph.outputs]

    def _value(self, s: _Slot, env: dict[str, Any]) -> Any:
        if s.target:
            return getattr(self, s.target)
        return self.known[s.name] if s.kind == "known" else env[s.name]

    def _output(self, name: str, env: dict[str, Any]) -> torch.Tensor:
        v = env[name] if name in env else self.known[name]
        return v.tensor() if isinstance(v, ShapeVec) else v

    def _apply(
        self,
        node: onnx.NodeProto,
        attrs: dict[str, Any],
        r: Rule,
        values: list[Any],
        known: list[Any],
        lists: list[Any],
        params: list[bool],
        env: dict[str, Any],
    ) -> tuple[Any, ...]:
        call = OpCall(
            node, attrs, self.opset, values, known, lists, params, functools.partial(self._run_graph, env)
        )
        try:
            out = NotImplemented
            if node.op_type in SHAPE_RULES and any(isinstance(v, ShapeVec) for v in values):
                out = SHAPE_RULES[node.op_type](call)
            if out is NotImplemented:
                out = r.fn(call)
        except RegcError:
            raise
        except Exception as e:  # a torch error inside a rule: name the node
            raise CaptureError(
                f"node '{call.name}' ({call.op}, opset {call.opset}) failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from e
        outs = out if isinstance(out, tuple) else (out,)
        for k, name in enumerate(node.output):
            if name and (k >= len(outs) or outs[k] is None):
                raise call.fail(f"output {k} ('{name}') is not supported")
        return outs


def _as_list(v: Any) -> list[Any] | None:
    if isinstance(v, torch.Tensor) and v.numel() <= _LIST_LIMIT:
        return v.reshape(-1).tolist()
    return None
