"""Which weights a training-time pass touches: conv/linear layers (by op class) or parameters,
selected by glob patterns on user names (``layers=features.*:classifier``), plus per-tensor stats.

A layer's name is its weight's user name without a trailing ``.weight`` (``features.0`` for
``features.0.weight``; ONNX initializer names are used whole). A pattern matches the layer name or
the parameter's user name. Linear-like and conv-like nodes whose weight is not a parameter are
skipped and counted, never an error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Sequence

import torch
import torch.fx as fx

from regc.ir import Model
from regc.opclass import OpClass, conv_view, linear_view, op_class

__all__ = ["Layer", "weighted_layers", "matching_params", "tensor_stats"]


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    weight: str     # graph attribute target of the weight
    kind: str       # "linear" | "conv"
    out_dim: int    # weight axis of the output channels/neurons
    in_dim: int     # weight axis of the input channels/features


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _layer_name(user: str) -> str:
    return user[: -len(".weight")] if user.endswith(".weight") else user


def weighted_layers(model: Model, patterns: Sequence[str] = ()) -> tuple[list[Layer], list[str]]:
    """(layers in graph order, skipped node names). Shared weights appear once."""
    layers: list[Layer] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for node in model.call_nodes():
        lv, cv = linear_view(node, model.gm), conv_view(node, model.gm)
        if lv is None and cv is None:
            cls = op_class(node)
            reads_attr = any(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args)
            if cls is OpClass.CONV or (cls is OpClass.LINEAR and reads_attr):
                skipped.append(node.name)  # e.g. a weight held as a non-float buffer
            continue
        if lv is not None:
            weight, out_dim = lv.weight, (0 if lv.layout == "out_in" else 1)
            kind = "linear"
        else:
            weight, out_dim = cv.weight, (1 if cv.transposed else 0)
            kind = "conv"
        user = model.user_name(weight)
        if weight in seen or not _matches((user, _layer_name(user)), patterns):
            continue
        seen.add(weight)
        layers.append(Layer(_layer_name(user), weight, kind, out_dim, 1 - out_dim))
    return layers, skipped


def matching_params(model: Model, patterns: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(user name, target) of every trainable floating-point parameter whose name matches."""
    out = []
    for target, p in model.named_parameters():
        user = model.user_name(target)
        if p.requires_grad and p.is_floating_point() and _matches((user, _layer_name(user)), patterns):
            out.append((user, target))
    return out


def tensor_stats(w: torch.Tensor, group_dim: int | None = None) -> dict[str, float]:
    """l1, max |w|, fraction |w| < 1e-3, kurtosis, and (with a group axis) the all-zero groups."""
    w = w.detach().double()
    z = (w - w.mean()) / w.std() if w.numel() > 1 and w.std() > 0 else torch.zeros_like(w)
    out = {"l1": float(w.abs().sum()), "max_abs": float(w.abs().max()),
           "near_zero": float((w.abs() < 1e-3).double().mean()), "kurtosis": float((z**4).mean())}
    if group_dim is not None:
        norms = w.transpose(0, group_dim).reshape(w.shape[group_dim], -1).norm(dim=1)
        out["groups"] = int(norms.numel())
        out["zero_groups"] = int((norms == 0).sum())
    return out
