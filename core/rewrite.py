"""The user-facing graph-rewrite API: pattern + replacement + check, with a tracer.

A ``Rule`` matches a tree of ``call_function`` nodes rooted at one node::

    Op(aten.dropout.default, Var("x"), Any(), False)      # dropout(x, p, train=False)
    Op((aten.clamp.default, aten.hardtanh.default), Var("x"), 0.0, 6.0)

``Var(name)`` binds any argument (the same name must bind the same value twice), ``Param(name)``
binds a ``get_attr`` of a floating-point parameter, ``Any()`` matches anything, ``Lit(pred)``
matches a literal for which ``pred`` is true, and a plain Python value matches an equal literal.
An ``Op`` with fewer argument patterns than the node has arguments ignores the rest.

``replace(m: Match) -> fx.Node | value`` builds the replacement with ``m.call(op, *args)`` (nodes
are inserted before the root) and returns what the root's users should use instead. ``check(m)``
returns ``None`` to accept or a string: the reason it rejects, which the tracer records. Rule sets
become passes with ``register_rules``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any as _AnyT
from typing import Callable, Iterable, Sequence

import torch.fx as fx

from regc.ir import Model
from regc.opclass import is_param_node
from regc.registry import PassResult, Phase, register_pass

__all__ = ["Op", "Var", "Param", "Any", "Lit", "Match", "Rule", "TraceEntry", "rewrite", "explain",
           "register_rules"]


@dataclasses.dataclass(frozen=True)
class Var:
    name: str


@dataclasses.dataclass(frozen=True)
class Param:
    name: str


@dataclasses.dataclass(frozen=True)
class Any:
    pass


@dataclasses.dataclass(frozen=True)
class Lit:
    pred: Callable[[_AnyT], bool]
    desc: str = "literal"


@dataclasses.dataclass(frozen=True)
class Op:
    targets: _AnyT
    args: tuple

    def __init__(self, targets, *args):
        object.__setattr__(self, "targets", targets if isinstance(targets, tuple) else (targets,))
        object.__setattr__(self, "args", args)


class _NoMatch(Exception):
    pass


@dataclasses.dataclass
class Match:
    """Bindings of one match; ``m["x"]`` is what ``Var("x")``/``Param("x")`` bound."""

    model: Model
    root: fx.Node
    bindings: dict[str, _AnyT]
    nodes: list[fx.Node]

    def __getitem__(self, name: str) -> _AnyT:
        return self.bindings[name]

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.model.gm.graph.inserting_before(self.root):
            return self.model.gm.graph.call_function(target, tuple(args), kwargs)

    def param(self, name: str):
        """The tensor behind a ``Param`` binding."""
        return self.model.get_tensor(self.bindings[name].target)


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    pattern: Op
    replace: Callable[[Match], _AnyT]
    check: Callable[[Match], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    rule: str
    node: str
    matched: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} @ %{self.node}: {'rewritten' if self.matched else 'no match'}" + (
            f" ({self.reason})" if self.reason else "")


def _match(p, v, model: Model, b: dict, nodes: list, path: str) -> None:
    if isinstance(p, Var):
        if p.name in b and b[p.name] is not v and b[p.name] != v:
            raise _NoMatch(f"{path}: '{p.name}' already bound to a different value")
        b[p.name] = v
    elif isinstance(p, Param):
        if not is_param_node(v, model.gm):
            raise _NoMatch(f"{path}: expected a parameter for '{p.name}', got {_desc(v)}")
        b[p.name] = v
    elif isinstance(p, Any):
        return
    elif isinstance(p, Lit):
        if isinstance(v, fx.Node) or not p.pred(v):
            raise _NoMatch(f"{path}: expected {p.desc}, got {_desc(v)}")
    elif isinstance(p, Op):
        if not isinstance(v, fx.Node) or v.op != "call_function" or v.target not in p.targets:
            want = " or ".join(str(t) for t in p.targets)
            raise _NoMatch(f"{path}: expected {want}, got {_desc(v)}")
        if nodes and len(v.users) > 1:
            raise _NoMatch(f"{path}: %{v.name} has {len(v.users)} users, an inner node may have one")
        if len(v.args) < len(p.args):
            raise _NoMatch(f"{path}: %{v.name} has {len(v.args)} arguments, pattern needs {len(p.args)}")
        nodes.append(v)
        for i, (sp, sv) in enumerate(zip(p.args, v.args)):
            _match(sp, sv, model, b, nodes, f"{path}.arg{i}")
    elif isinstance(v, fx.Node) or v != p:
        raise _NoMatch(f"{path}: expected literal {p!r}, got {_desc(v)}")


def _desc(v) -> str:
    if isinstance(v, fx.Node):
        return f"%{v.name} ({v.op} {v.target})"
    return repr(v)


def _try(rule: Rule, node: fx.Node, model: Model) -> tuple[Match | None, str]:
    b: dict = {}
    nodes: list = []
    try:
        _match(rule.pattern, node, model, b, nodes, "root")
    except _NoMatch as e:
        return None, str(e)
    m = Match(model, node, b, nodes)
    if rule.check is not None:
        reason = rule.check(m)
        if reason:
            return None, f"check rejected: {reason}"
    return m, ""


def rewrite(model: Model, rules: Sequence[Rule], *, max_iters: int = 10
            ) -> tuple[int, list[TraceEntry]]:
    """Apply ``rules`` until none fires (at most ``max_iters`` sweeps). Returns (rewrites, trace).

    The trace has one entry per candidate: a node whose op is the root op of a rule.
    """
    count = 0
    trace: list[TraceEntry] = []
    erased: set[fx.Node] = set()
    for _ in range(max_iters):
        fired = False
        for node in list(model.gm.graph.nodes):
            if node in erased or node.op != "call_function":
                continue
            for rule in rules:
                if node.target not in rule.pattern.targets:
                    continue
                m, reason = _try(rule, node, model)
                trace.append(TraceEntry(rule.name, node.name, m is not None, reason))
                if m is None:
                    continue
                new = rule.replace(m)
                if not isinstance(new, fx.Node):
                    raise TypeError(f"rule '{rule.name}' must return an fx.Node, got {type(new).__name__}")
                node.replace_all_uses_with(new)
                for dead in m.nodes:
                    if not dead.users:
                        model.gm.graph.erase_node(dead)
                        erased.add(dead)
                count += 1
                fired = True
                break
        if not fired:
            break
    if count:
        model.recompile()
    return count, trace


def explain(model: Model, rules: Sequence[Rule]) -> list[TraceEntry]:
    """Why each candidate node would or would not match, without rewriting anything."""
    out = []
    for node in model.gm.graph.nodes:
        if node.op != "call_function":
            continue
        for rule in rules:
            if node.target in rule.pattern.targets:
                m, reason = _try(rule, node, model)
                out.append(TraceEntry(rule.name, node.name, m is not None, reason))
    return out


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    """A rule-set pass has no options."""


def register_rules(name: str, rules: Iterable[Rule], *, phase: Phase = Phase.CANONICALIZE, exact: bool = True,
                   doc: str = "") -> None:
    """Register a rule set as a pass named ``name``: it rewrites until no rule fires."""
    rules = tuple(rules)

    def run(model: Model, config: _NoOptions, ctx) -> PassResult:
        n, trace = rewrite(model, rules)
        fired: dict[str, int] = {}
        for t in trace:
            if t.matched:
                fired[t.rule] = fired.get(t.rule, 0) + 1
        return PassResult(model, n > 0, {"rewrites": n, "by_rule": fired})

    run.__doc__ = doc or f"Rule set '{name}': " + ", ".join(r.name for r in rules)
    run.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)  # the registering module
    register_pass(name, _NoOptions, phase=phase, exact=exact)(run)
