"""SmoothQuant: move activation outliers into the weights, exactly (Xiao et al., ICML 2023).

For an activation X read by linear layers W_k, per input channel j
    s_j = max|X_j|^alpha / max_k max_i |W_k[i, j]|^(1 - alpha),   W_k' = W_k diag(s),   X' = X / s
so every output is unchanged while X' has flatter channels. When X is a LayerNorm output the division
is folded into it (gamma' = gamma / s, beta' = beta / s; other readers of X get X' * s back).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from regc.ir import Model
from regc.opclass import is_param_node
from regc.passes._qdq import free_name
from regc.passes._quant_calib import ActStats
from regc.passes._quant_layers import QLayer

aten = torch.ops.aten

__all__ = ["smooth_candidates", "smooth"]


def smooth_candidates(model: Model, layers: list[QLayer]) -> dict[fx.Node, list[QLayer]]:
    """LayerNorm output node -> the linear layers that read it (explicit scaling measured no better
    on MiniLM's other linear inputs, so only the free, folded form is used)."""
    readers: dict[str, int] = {}
    for n in model.gm.graph.nodes:
        if n.op == "get_attr":
            readers[n.target] = readers.get(n.target, 0) + len(n.users)
    out: dict[fx.Node, list[QLayer]] = {}
    for layer in layers:
        if layer.kind == "linear" and layer.x is not None and _foldable(model, layer.x):
            out.setdefault(layer.x, []).append(layer)
    # a weight read elsewhere too (tied embeddings) cannot absorb the scale
    return {x: group for x, group in out.items() if all(readers[q.weight] == 1 for q in group)}


def _foldable(model: Model, x: fx.Node) -> bool:
    return (x.target is aten.layer_norm.default and len(x.args) > 3 and is_param_node(x.args[2], model.gm)
            and is_param_node(x.args[3], model.gm))


def smooth(model: Model, groups: dict[fx.Node, list[QLayer]], stats: dict[fx.Node, ActStats],
           alpha: float) -> int:
    """Apply the transform to every group with statistics; return how many LayerNorms were smoothed."""
    g = model.gm.graph
    done = 0
    for ln, linears in groups.items():
        if ln not in stats:
            continue
        ws = [model.get_tensor(q.weight).detach() for q in linears]
        w_absmax = torch.stack([w.abs().amax(0 if q.w_axis == 0 else 1)
                                for w, q in zip(ws, linears, strict=True)]).amax(0)
        s = (stats[ln].channel_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha))
        s = s.clamp(min=1e-5)
        for w, q in zip(ws, linears, strict=True):
            model.set_tensor(q.weight, w * (s if q.w_axis == 0 else s[:, None]))
        for t in (ln.args[2].target, ln.args[3].target):
            model.set_tensor(t, model.get_tensor(t).detach() / s)
        readers = [u for u in ln.users if u not in {q.node for q in linears}]
        done += 1
        if readers:
            name = free_name(model, f"{linears[0].name}_smooth")
            model.set_tensor(name, s, trainable=False)
            model.param_names[name] = f"{linears[0].name}:smooth_scale"
            with g.inserting_after(ln):
                s_node = g.get_attr(name)
            with g.inserting_after(s_node):
                scaled = g.call_function(aten.mul.Tensor, (ln, s_node))
            for u in readers:
                u.replace_input_with(ln, scaled)
    return done
