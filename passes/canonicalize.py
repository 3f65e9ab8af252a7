"""canonicalize: one spelling per computation, so later passes match fewer forms (exact).

Rules (each a regc.rewrite Rule; the algebra is in the name):
    dropout(x, p, train=False) -> x        clone(x) / alias(x) / contiguous(x) -> x
    clamp(x, 0, 6) -> hardtanh(x, 0, 6)    (ReLU6 has one form)
    view(x, shape(x)) -> x
    mul(x, 1) -> x                         add(x, 0) -> x   (scalar literals that keep x's dtype)
Dropping eval-mode dropout removes what ``Model.train_mode`` would switch on: run canonicalize
after training-time passes (its phase is first, so put training passes in a later phase or run it
on the trained model).
"""

from __future__ import annotations

import torch

from regc.rewrite import Any, Lit, Op, Rule, Var, register_rules

aten = torch.ops.aten


def _x(m):
    return m["x"]


def _same_shape(m):
    x, shape = m["x"], m["shape"]
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if val is None:
        return "input shape unknown"
    if list(val.shape) != list(shape) or any(not isinstance(s, int) for s in shape):
        return f"view changes shape {list(val.shape)} -> {list(shape)}"
    return None


def _to_hardtanh(m):
    return m.call(aten.hardtanh.default, m["x"], 0.0, 6.0)


def _keeps_dtype(m):
    lit = m.root.args[1]
    val = m["x"].meta.get("val") if isinstance(m["x"], torch.fx.Node) else None
    if val is None:
        return "input dtype unknown"
    if isinstance(lit, float) and not val.is_floating_point():
        return "a float literal would promote an integer tensor"
    return "add with alpha" if m.root.kwargs else None


_is = lambda value: Lit(lambda v, value=value: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
                        and v == value, f"{value}")

RULES = (
    Rule("dropout(x, p, False) -> x", Op(aten.dropout.default, Var("x"), Any(), False), _x),
    Rule("clone(x) -> x", Op(aten.clone.default, Var("x")), _x,
         check=lambda m: "clone with memory_format" if m.root.kwargs else None),
    Rule("alias(x) -> x", Op(aten.alias.default, Var("x")), _x),
    Rule("contiguous(x) -> x", Op(aten.contiguous.default, Var("x")), _x),
    Rule("view(x, shape(x)) -> x", Op(aten.view.default, Var("x"), Var("shape")), _x, check=_same_shape),
    Rule("clamp(x, 0, 6) -> hardtanh(x, 0, 6)", Op(aten.clamp.default, Var("x"), _is(0), _is(6)), _to_hardtanh),
    Rule("mul(x, 1) -> x", Op((aten.mul.Tensor, aten.mul.Scalar), Var("x"), _is(1)), _x, check=_keeps_dtype),
    Rule("add(x, 0) -> x", Op((aten.add.Tensor, aten.add.Scalar), Var("x"), _is(0)), _x, check=_keeps_dtype),
)

register_rules("canonicalize", RULES, doc=__doc__.split("\n")[0])
