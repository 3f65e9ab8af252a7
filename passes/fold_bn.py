"""fold_bn: fold inference BatchNorm into the preceding conv or linear layer (exact).

For y = BN(W x + b) with running stats (mu, var), affine (gamma, beta) and eps:
    s  = gamma / sqrt(var + eps)            (per output channel)
    W' = W * s[:, None, ...]                b' = (b - mu) * s + beta
so BN(W x + b) == W' x + b'. Only eval-mode BN (training=False) whose producer is a conv/linear
with a parameter weight and no other user is folded; the rest are counted as skipped.
"""

from __future__ import annotations

import dataclasses

import torch

from regc.ir import Model
from regc.opclass import conv_view, linear_view
from regc.registry import PassContext, PassResult, Phase, register_pass

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class FoldBnConfig:
    """Options for `fold_bn` (none)."""


@register_pass("fold_bn", FoldBnConfig, phase=Phase.CANONICALIZE, exact=True)
def fold_bn(model: Model, config: FoldBnConfig, ctx: PassContext) -> PassResult:
    """Fold eval-mode BatchNorm into the conv/linear before it: W' = W*s, b' = (b-mu)*s + beta."""
    gm = model.gm
    folded, skipped = [], []
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not aten.batch_norm.default:
            continue
        x, gamma, beta, mean, var, training, _, eps = bn.args[:8]
        prod = x if isinstance(x, torch.fx.Node) else None
        view = None
        if prod is not None and not training and len(prod.users) == 1 and mean is not None:
            cv = conv_view(prod, gm)
            lv = linear_view(prod, gm)
            if cv is not None and not cv.transposed:
                view = (cv.weight, cv.bias, 0)
            elif lv is not None and lv.layout == "out_in":
                view = (lv.weight, lv.bias, 0)
        if view is None or _shared(gm, view[0]):
            skipped.append(bn.name)
            continue
        w_t, b_t, _ = view
        w = model.get_tensor(w_t).detach()
        mu = model.get_tensor(mean.target).detach()
        s = torch.rsqrt(model.get_tensor(var.target).detach() + eps)
        if gamma is not None:
            s = s * model.get_tensor(gamma.target).detach()
        b = model.get_tensor(b_t).detach() if b_t else torch.zeros_like(mu)
        new_b = (b - mu) * s + (model.get_tensor(beta.target).detach() if beta is not None else 0)
        model.set_tensor(w_t, w * s.reshape(-1, *([1] * (w.dim() - 1))))
        if b_t is None:
            b_t = model.free_target(w_t.rsplit(".", 1)[0] + ".bias" if "." in w_t else w_t + "_bias")
            model.set_tensor(b_t, new_b)
            with gm.graph.inserting_before(prod):
                b_node = gm.graph.get_attr(b_t)
            args = list(prod.args) + [None] * max(0, 3 - len(prod.args))
            args[2] = b_node
            prod.args = tuple(args)
            model.param_names[b_t] = model.user_name(w_t) + ":folded_bias"
        else:
            model.set_tensor(b_t, new_b)
        bn.replace_all_uses_with(prod)
        gm.graph.erase_node(bn)
        folded.append(bn.name)
    if folded:
        model.recompile()
    return PassResult(model, bool(folded), {"folded": len(folded), "skipped": skipped})


def _shared(gm, target: str) -> bool:
    return sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == target) != 1 or any(
        len(n.users) != 1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
