"""Stable text form of a Model for tests, ``--dump-ir`` and diffs.

    inputs: x f32[2, 3, 32, 32]
    params: conv1.weight f32[16, 3, 3, 3] ...
    %conv2d = aten.conv2d(%x, @conv1.weight, @conv1.bias) -> f32[2, 16, 32, 32]  # conv-like
    outputs: %linear
Names are the graph's node names; shapes come from ``node.meta['val']`` when known.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from regc.opclass import OpClass, op_class

__all__ = ["print_model", "fmt_type"]

_DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
       torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool",
       torch.int16: "i16"}


def fmt_type(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{_DT.get(t.dtype, str(t.dtype))}{list(t.shape)}"
    if isinstance(t, (tuple, list)):
        return "(" + ", ".join(fmt_type(x) for x in t) + ")"
    return type(t).__name__


def _fmt_arg(a, attrs: dict[str, str]) -> str:
    if isinstance(a, fx.Node):
        return attrs.get(a.name, f"%{a.name}")
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_fmt_arg(x, attrs) for x in a)
        return f"[{inner}]"
    return repr(a)


def print_model(model) -> str:
    gm = model.gm
    lines = []
    ins = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lines.append("inputs: " + ", ".join(
        f"{name} {fmt_type(n.meta.get('val'))}" for name, n in zip(model.input_names, ins)))
    state = dict(gm.named_parameters())
    state.update(gm.named_buffers())
    lines.append("params: " + ", ".join(f"{k} {fmt_type(v)}" for k, v in state.items()))
    attrs = {n.name: f"@{n.target}" for n in gm.graph.nodes if n.op == "get_attr"}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            target = str(n.target).replace("aten.", "aten.").rsplit(".default", 1)[0]
            args = ", ".join([_fmt_arg(a, attrs) for a in n.args]
                             + [f"{k}={_fmt_arg(v, attrs)}" for k, v in n.kwargs.items()])
            cls = op_class(n, gm)
            note = f"  # {cls.value}" if cls is not OpClass.OTHER else ""
            lines.append(f"%{n.name} = {target}({args}) -> {fmt_type(n.meta.get('val'))}{note}")
        elif n.op == "output":
            lines.append("outputs: " + _fmt_arg(n.args[0], attrs))
    return "\n".join(lines)
