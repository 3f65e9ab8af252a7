"""Importance of pruning units (the policy), apart from the dependency graph (the mechanism).

A unit's weights are the slices that make it, in every coupled layer of its group: filters or rows,
biases, norm affine parameters (the group sum of Fang et al., 2023, over the producing side; the
input columns of the layers that read it are left out, so a unit whose producers are zero scores 0).

    l1:      I_u = sum_{w in u} |w|
    l2:      I_u = sum_{w in u} w^2
    fisher:  I_u = 1/2 sum_{w in u} F_w w^2, F the diagonal empirical Fisher: the Optimal Brain
             Damage saliency (LeCun et al., 1990) with the Hessian replaced by the Fisher
             (Theis et al., 2018)
    taylor:  I_u = sum_batches (sum_{w in u} g_w w)^2: the squared first-order Taylor estimate of the
             loss change when the unit is removed (Molchanov et al., CVPR 2019)

fisher and taylor use the data's labels when it has them (cross-entropy for integer labels, squared
error for float ones), else distillation to Gaussian-perturbed outputs (see ``regc.passes._fisher``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regc.data import Dataset
from regc.errors import InputMismatchError
from regc.ir import Model
from regc.passes._depgraph import Group
from regc.passes._fisher import diag_fisher

__all__ = ["IMPORTANCE", "unit_importance"]

IMPORTANCE = ("l1", "l2", "fisher", "taylor")


def unit_importance(model: Model, groups: list[Group], kind: str, data: Dataset | None = None, *,
                    batch_size: int = 32, max_samples: int = 0) -> list[torch.Tensor]:
    """One score per unit of each group (higher = more important)."""
    targets = sorted({s.target for g in groups for s, _ in g.members
                      if isinstance(model.get_tensor(s.target), torch.nn.Parameter)})
    weights = {t: model.get_tensor(t).detach() for t in targets}
    if kind == "l1":
        return [g.reduce({t: w.abs() for t, w in weights.items()}) for g in groups]
    if kind == "l2":
        return [g.reduce({t: w * w for t, w in weights.items()}) for g in groups]
    loss = "labels" if data.labels is not None else "distill"
    if kind == "fisher":
        fisher, _ = diag_fisher(model, targets, data, loss=loss, mode="batch", batch_size=batch_size,
                                max_samples=max_samples, who="prune")
        return [0.5 * g.reduce({t: fisher[t] * weights[t].double() ** 2 for t in targets}) for g in groups]
    return _taylor(model, groups, targets, data, loss, batch_size, max_samples)


def _taylor(model: Model, groups: list[Group], targets: list[str], data: Dataset, loss: str,
            batch_size: int, max_samples: int) -> list[torch.Tensor]:
    params = [model.get_tensor(t) for t in targets]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    gen = torch.Generator().manual_seed(0)
    scores = [torch.zeros(len(g.units), dtype=torch.float64) for g in groups]
    try:
        model.train_mode(False)
        for name, p in model.named_parameters():
            p.requires_grad_(name in targets)
        for xs, y in _batches(model, data, batch_size, max_samples):
            grads = torch.autograd.grad(_loss(model.run(*xs), y, loss, gen), params, allow_unused=True)
            gw = {t: (g * p).detach()
                  for t, g, p in zip(targets, grads, params, strict=True) if g is not None}
            for acc, grp in zip(scores, groups, strict=True):
                acc += grp.reduce(gw) ** 2
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train_mode(was_training)
    return scores


def _batches(model: Model, data: Dataset, batch_size: int, max_samples: int):
    """Batches of ``batch_size`` (of the example's size when the batch axis is static)."""
    n = len(data) if max_samples <= 0 else min(max_samples, len(data))
    bs = min(batch_size, n)
    try:
        model.check_inputs(data.batch(0, bs, like=model.example_inputs))
    except InputMismatchError:
        bs = model.example_inputs[0].shape[0]
    for start in range(0, n - bs + 1, bs):
        yield data.batch(start, start + bs, like=model.example_inputs), (
            data.labels[start:start + bs] if data.labels is not None else None)


def _loss(outs: tuple[torch.Tensor, ...], labels: torch.Tensor | None, loss: str,
          gen: torch.Generator) -> torch.Tensor:
    """Task loss with labels; without, distillation to Gaussian-perturbed outputs (a non-zero gradient)."""
    y = outs[0]
    if loss == "distill":
        return 0.5 * sum(((o - o.detach() - torch.randn(o.shape, generator=gen)) ** 2).sum()
                         for o in outs if o.is_floating_point()) / y.shape[0]
    if labels.is_floating_point():
        return 0.5 * ((y - labels.to(y.dtype).reshape(y.shape)) ** 2).sum() / y.shape[0]
    return F.cross_entropy(y.movedim(-1, 1), labels.long())
