"""The user-facing rewrite API: patterns, checks with reasons, the tracer, rule sets as passes."""

import torch

import regc
from regc.rewrite import Any, Lit, Op, Param, Rule, Var, explain, register_rules, rewrite

aten = torch.ops.aten


class Swishy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        h = h * torch.sigmoid(h)          # matches x * sigmoid(x)
        g = self.b(h)
        return g * torch.sigmoid(h)       # does not: different operands


SILU = Rule(
    "x*sigmoid(x) -> silu(x)",
    Op(aten.mul.Tensor, Var("x"), Op(aten.sigmoid.default, Var("x"))),
    replace=lambda m: m.call(aten.silu.default, m["x"]),
)


def test_rewrite_fires_once_and_keeps_outputs():
    m = regc.capture(Swishy(), (torch.randn(3, 6),))
    x = torch.randn(3, 6)
    ref = m(x).detach()
    n, trace = rewrite(m, [SILU])
    assert n == 1
    targets = [nd.target for nd in m.call_nodes()]
    assert targets.count(aten.silu.default) == 1 and targets.count(aten.sigmoid.default) == 1
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    rejected = [t for t in trace if not t.matched]
    assert rejected and "already bound to a different value" in rejected[0].reason


def test_check_reason_is_traced_and_blocks():
    rule = Rule("linear(x, W, b) with small W", Op(aten.linear.default, Var("x"), Param("w"), Any()),
                replace=lambda m: m.root, check=lambda m: "weight too large" if m.param("w").numel() > 10 else None)
    m = regc.capture(Swishy(), (torch.randn(3, 6),))
    entries = explain(m, [rule])
    assert len(entries) == 2 and all(not e.matched for e in entries)
    assert all(e.reason == "check rejected: weight too large" for e in entries)
    assert "no match (check rejected: weight too large)" in str(entries[0])


def test_literal_patterns_explain_mismatch():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.clamp(x, 0, 6) + torch.clamp(x, 0, 1)

    m = regc.capture(M(), (torch.randn(4),))
    six = Lit(lambda v: v == 6, "6")
    rule = Rule("relu6", Op(aten.clamp.default, Var("x"), 0, six), replace=lambda m: m.call(aten.hardtanh.default, m["x"], 0.0, 6.0))
    entries = explain(m, [rule])
    assert [e.matched for e in entries] == [True, False]
    assert "expected 6, got 1" in entries[1].reason


def test_rule_set_registers_as_pass():
    register_rules("_test_fuse_silu", [SILU])
    m = regc.capture(Swishy(), (torch.randn(3, 6),))
    out = regc.compress(m, "_test_fuse_silu")
    assert aten.silu.default in [n.target for n in out.call_nodes()]


def test_readme_rewrite_example(tmp_path):
    """The README's rewrite example runs as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- example: rewrite -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README must keep the rewrite example marked <!-- example: rewrite -->"
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert scope["n"] == 1
