"""Parametrizations of graph parameters: W = f_k(...f_1(V)) while training, folded to a plain W after.

``install(model, target, fns)`` replaces the parameter behind ``target`` by a holder submodule
``_regc_param_<i>`` that owns the latent ``V`` (initialized to ``f_1^-1(...f_k^-1(W))`` through each
``fn.right_inverse`` when present, else ``W``) and the ``fns`` (modules whose own parameters train
with the model); every ``get_attr target`` node becomes a ``call_module`` of the holder.
``fold(model, name)`` writes ``W = holder()`` back as a plain parameter, restores the ``get_attr``
nodes and removes the holder, so the exported graph carries no trace of the parametrization.
This is a graph rewrite rather than ``torch.nn.utils.parametrize`` because the latter swaps the
class of a top-level GraphModule, which then no longer deep-copies.
"""

from __future__ import annotations

from typing import Sequence

import torch

from regc.ir import Model, _delete_attr

__all__ = ["PREFIX", "Holder", "install", "fold"]

PREFIX = "_regc_param_"


class Holder(torch.nn.Module):
    """forward() = fns[-1](...fns[0](original)); ``target`` names the folded parameter."""

    def __init__(self, target: str, original: torch.Tensor, fns: Sequence[torch.nn.Module], trainable: bool,
                 slots: Sequence[str]):
        super().__init__()
        self.target = target
        self.slots = list(slots)  # the owner's parameter names in order, restored by fold
        self.fns = torch.nn.ModuleList(fns)
        with torch.no_grad():
            v = original.detach()
            for fn in reversed(self.fns):
                v = fn.right_inverse(v) if hasattr(fn, "right_inverse") else v
        self.original = torch.nn.Parameter(v.clone(), requires_grad=trainable)

    def forward(self) -> torch.Tensor:
        w = self.original
        for fn in self.fns:
            w = fn(w)
        return w


def install(model: Model, target: str, fns: Sequence[torch.nn.Module]) -> str:
    """Parametrize the parameter ``target`` through ``fns``; returns the holder's submodule name."""
    gm = model.gm
    w = model.get_tensor(target)
    i = 0
    while hasattr(gm, f"{PREFIX}{i}"):
        i += 1
    name = f"{PREFIX}{i}"
    gm.add_module(name, Holder(target, w, fns, w.requires_grad, list(_owner(gm, target)._parameters)))
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target == target:
            with gm.graph.inserting_before(n):
                new = gm.graph.call_module(name)
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
    _delete_attr(gm, target)
    gm.recompile()
    return name


def fold(model: Model, name: str) -> None:
    """Write the holder's current output back as the plain parameter it replaced."""
    gm = model.gm
    holder: Holder = getattr(gm, name)
    with torch.no_grad():
        w = holder().detach()
    model.set_tensor(holder.target, w, trainable=True)
    model.get_tensor(holder.target).requires_grad_(holder.original.requires_grad)
    owner = _owner(gm, holder.target)
    rank = {k: i for i, k in enumerate(holder.slots)}
    owner._parameters = dict(sorted(owner._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == name:
            with gm.graph.inserting_before(n):
                new = gm.graph.get_attr(holder.target)
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
    delattr(gm, name)
    gm.recompile()


def _owner(gm: torch.nn.Module, target: str) -> torch.nn.Module:
    mod = gm
    for part in target.split(".")[:-1]:
        mod = getattr(mod, part)
    return mod

