"""What each ``regularize`` kind contributes to the training plan (the math is in ``_reg_math``).

``build(model, cfg, spec, plan)`` adds loss terms / hooks / parametrizations to ``plan`` and returns
the tensors whose statistics the pass reports: ``[(user name, target, group axis or None)]``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from regc.errors import ConfigError
from regc.ir import Model
from regc.passes import _gg_math as gg
from regc.passes import _reg_math as rm
from regc.passes._reg_layers import Layer, matching_params, weighted_layers
from regc.train import Batch, Step, TrainPlan, TrainSpec

__all__ = ["BUILDERS", "Targets"]

Targets = list[tuple[str, str, int | None]]


def _layers(model: Model, cfg: Any) -> list[Layer]:
    layers, _ = weighted_layers(model, cfg.layers)
    if not layers:
        raise ConfigError(f"regularize{{kind={cfg.kind}}}: no conv/linear layer with a parameter weight "
                          f"matches layers={':'.join(cfg.layers) or '(all)'}")
    return layers


def _params(model: Model, cfg: Any) -> list[tuple[str, str]]:
    ps = matching_params(model, cfg.layers)
    if not ps:
        raise ConfigError(f"regularize{{kind={cfg.kind}}}: no trainable parameter matches "
                          f"layers={':'.join(cfg.layers)}")
    return ps


def _gdim(layer: Layer, cfg: Any) -> int:
    return layer.out_dim if cfg.groups == "out" else layer.in_dim


def _penalty(model: Model, cfg: Any, plan: TrainPlan, value: Callable[[torch.Tensor, Layer], torch.Tensor],
             prox: Callable[[torch.Tensor, Layer, float], torch.Tensor]) -> Targets:
    """A weight penalty as a loss term, or (proximal=true) as a proximal step after each optimizer step."""
    layers = _layers(model, cfg)
    if cfg.prox:
        def step(m: Model, st: Step) -> None:
            for L in layers:
                w = m.get_tensor(L.weight)
                w.copy_(prox(w, L, st.lr * cfg.lam))

        plan.add_after_step(f"{cfg.kind}_prox", step)
    else:
        plan.add_loss(cfg.kind, lambda m, b: sum(value(m.get_tensor(L.weight), L) for L in layers),
                      weight=cfg.lam)
    return [(L.name, L.weight, _gdim(L, cfg)) for L in layers]


def _l1(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    return _penalty(model, cfg, plan, lambda w, L: rm.l1(w), lambda w, L, t: rm.prox_l1(w, t))


def _group_lasso(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    return _penalty(model, cfg, plan, lambda w, L: rm.group_lasso(w, _gdim(L, cfg)),
                    lambda w, L, t: rm.prox_group_lasso(w, _gdim(L, cfg), t))


def _wgsef(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    def k_of(w: torch.Tensor, L: Layer) -> float:
        groups = w.shape[_gdim(L, cfg)]
        return cfg.keep * w.numel() if cfg.weighting == "budget" else max(1, round(cfg.keep * groups))

    def value(w: torch.Tensor, L: Layer) -> torch.Tensor:
        g = rm.group_view(w, _gdim(L, cfg))
        sizes = torch.full((g.shape[0],), float(g.shape[1]), dtype=w.dtype)
        return rm.sef_value(g.norm(dim=1), k_of(w, L), sizes, cfg.weighting)

    return _penalty(model, cfg, plan, value,
                    lambda w, L, t: rm.sef_prox(w, _gdim(L, cfg), t, k_of(w, L), cfg.weighting))


class _Record:
    """A checkpointed dict of floats (e.g. the last BackSlash shape)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def state_dict(self) -> dict[str, float]:
        return dict(self.values)

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.values = dict(d)


def _backslash(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    params = _params(model, cfg)
    rec = _Record()

    def step(m: Model, st: Step) -> None:
        rec.values["nu"] = gg.backslash_step([m.get_tensor(t) for _, t in params], cfg.lam, cfg.clip)

    plan.add_after_step("backslash", step)
    plan.add_state("backslash", rec)
    return [(u, t, None) for u, t in params]


def _wdr(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    layers = _layers(model, cfg)
    if cfg.skip_first and len(layers) > 1:
        layers = layers[1:]
    plan.add_loss("wdr", lambda m, b: rm.wdr([m.get_tensor(L.weight) for L in layers], cfg.kurtosis_target,
                                             cfg.kurt_weight), weight=cfg.lam)
    return [(L.name, L.weight, None) for L in layers]


class _SampleStore:
    """Per-sample rows kept across epochs in ``slots`` ring slots, each stamped with its epoch."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.values = torch.zeros(slots, 0, 0)
        self.stamp = torch.full((slots, 0), -1, dtype=torch.long)

    def put(self, epoch: int, index: torch.Tensor, rows: torch.Tensor) -> None:
        index, rows = _gather(index), _gather(rows.detach().float())
        n = int(index.max()) + 1
        if n > self.values.shape[1] or self.values.shape[2] != rows.shape[1]:
            grown = torch.zeros(self.slots, max(n, self.values.shape[1]), rows.shape[1])
            stamp = torch.full((self.slots, grown.shape[1]), -1, dtype=torch.long)
            if self.values.numel():
                grown[:, : self.values.shape[1]] = self.values
                stamp[:, : self.stamp.shape[1]] = self.stamp
            self.values, self.stamp = grown, stamp
        s = epoch % self.slots
        self.values[s, index] = rows
        self.stamp[s, index] = epoch

    def get(self, epoch: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows recorded at ``epoch``, mask of the samples that have one)."""
        s = epoch % self.slots
        if epoch < 0 or index.numel() == 0 or int(index.max()) >= self.values.shape[1]:
            none = torch.zeros(len(index), dtype=torch.bool)
            return torch.zeros(len(index), max(self.values.shape[2], 1)), none
        return self.values[s, index], self.stamp[s, index] == epoch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "stamp": self.stamp}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.values, self.stamp = d["values"], d["stamp"]


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over processes (equal shapes: the driver gives every process equal slices)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _need(b: Batch, kind: str, labels: bool = True) -> None:
    if b.index is None:
        raise ConfigError(f"regularize{{kind={kind}}} needs sample indices: train on a regc.Dataset / .npz "
                          "or give batches as dicts with an 'index' entry")
    if labels and b.labels is None:
        raise ConfigError(f"regularize{{kind={kind}}} needs labels in the training data")


def _saf(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    store = _SampleStore(cfg.lag + 1)

    def term(m: Model, b: Batch) -> torch.Tensor:
        _need(b, "saf", labels=False)
        past, has = store.get(b.epoch - cfg.lag, b.index)
        store.put(b.epoch, b.index, b.output)
        if b.epoch <= cfg.start_epoch or not bool(has.any()):
            return b.output.sum() * 0
        return rm.saf_kl(b.output[has], past[has].to(b.output), cfg.temperature) * has.float().mean()

    plan.add_loss("saf", term, weight=cfg.lam)
    plan.add_state("saf", store)
    return []


def _pskd(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    if spec.steps:
        raise ConfigError("regularize{kind=pskd} schedules alpha over epochs: set train.epochs, "
                          "not train.steps")
    store = _SampleStore(2)

    def loss(m: Model, b: Batch) -> torch.Tensor:
        _need(b, "pskd")
        prev, has = store.get(b.epoch - 1, b.index)
        onehot = torch.nn.functional.one_hot(b.labels.long(), b.output.shape[-1]).to(b.output)
        prev = torch.where(has.unsqueeze(1), prev.to(b.output), onehot)  # epoch 0: the one-hot labels
        alpha = cfg.alpha * (b.epoch + 1) / spec.epochs
        out = rm.pskd_loss(b.output, b.labels, prev, alpha)
        store.put(b.epoch, b.index, torch.softmax(b.output.detach(), -1))
        return out

    plan.set_task_loss("pskd", loss)
    plan.add_state("pskd", store)
    return []


def _stablemax(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    def loss(m: Model, b: Batch) -> torch.Tensor:
        if b.labels is None:
            raise ConfigError("regularize{kind=stablemax} needs labels in the training data")
        return rm.stablemax_ce(b.output, b.labels)

    plan.set_task_loss("stablemax", loss)
    return []


def _perpgrad(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    params = _params(model, cfg)

    def edit(m: Model, st: Step) -> None:
        for _, t in params:
            p = m.get_tensor(t)
            if p.grad is not None:
                p.grad = rm.perp_grad(p.detach(), p.grad, cfg.rescale)

    plan.add_before_step("perpgrad", edit)
    return [(u, t, None) for u, t in params]


class _Gsnr:
    def __init__(self) -> None:
        self.scale: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.scale)

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.scale = dict(d)


def _sgd_sai(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    params = _params(model, cfg)
    gs = _Gsnr()
    beta = spec.momentum

    def edit(m: Model, st: Step) -> None:
        for _, t in params:
            p = m.get_tensor(t)
            if p.grad is None:
                continue
            if t not in gs.scale:  # frozen at the first step it has a gradient
                gs.scale[t] = rm.gsnr(p.grad)
            with torch.no_grad():
                p.mul_(1 - st.lr * spec.weight_decay)
            p.grad.mul_(gs.scale[t])

    plan.set_optimizer("sgd_sai", lambda ps, sp: torch.optim.SGD(ps, lr=sp.lr, momentum=beta, dampening=beta))
    plan.add_before_step("sgd_sai", edit)
    plan.add_state("sgd_sai", gs)
    return [(u, t, None) for u, t in params]


class NestedMask(torch.nn.Module):
    """W -> W * m along the input axis; m keeps the first k inputs. Training: k ~ p(k) ∝ exp(-((k-1)/width)^2)
    per forward (one k per mini-batch); eval: k = keep_dims (0 = all)."""

    def __init__(self, axis: int, dims: int, width: float, keep_dims: int, seed: int):
        super().__init__()
        self.axis, self.dims, self.keep_dims = axis, dims, keep_dims or dims
        self.register_buffer("probs", rm.nested_probs(dims, width), persistent=False)
        self.gen = torch.Generator().manual_seed(seed)
        self.last_k = self.keep_dims

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.last_k = int(torch.multinomial(self.probs, 1, generator=self.gen)) + 1
        k = self.last_k if self.training else self.keep_dims
        if k >= self.dims:
            return w
        shape = [1] * w.dim()
        shape[self.axis] = self.dims
        mask = (torch.arange(self.dims) < k).to(w).reshape(shape)
        return w * mask


def _nested_dropout(model: Model, cfg: Any, spec: TrainSpec, plan: TrainPlan) -> Targets:
    layers = [L for L in _layers(model, cfg) if L.kind == "linear"]
    if not layers:
        raise ConfigError("regularize{kind=nested_dropout} masks the input of a linear layer; none matches")
    L = layers[-1]  # the classifier: the last matching linear layer
    dims = model.get_tensor(L.weight).shape[L.in_dim]
    if cfg.keep_dims > dims:
        raise ConfigError(f"regularize.keep_dims must be in [0, {dims}] for layer '{L.name}', "
                          f"got {cfg.keep_dims}")
    plan.add_parametrization("nested_dropout", L.weight, NestedMask(L.in_dim, dims, cfg.width, cfg.keep_dims,
                                                                    spec.seed))
    return [(L.name, L.weight, L.in_dim)]


BUILDERS: dict[str, Callable[[Model, Any, TrainSpec, TrainPlan], Targets]] = {
    "l1": _l1, "group_lasso": _group_lasso, "wgsef": _wgsef, "backslash": _backslash, "wdr": _wdr,
    "saf": _saf, "pskd": _pskd, "stablemax": _stablemax, "perpgrad": _perpgrad, "sgd_sai": _sgd_sai,
    "nested_dropout": _nested_dropout,
}
