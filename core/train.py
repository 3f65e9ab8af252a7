"""regc.train: the one training driver that training-time passes share.

    spec = TrainSpec(data="train.npz", loss="ce", optimizer="sgd", lr=0.05, epochs=3)
    plan = TrainPlan()
    plan.add_loss("l1", lambda model, batch: model.get_tensor("fc.weight").abs().sum(), weight=1e-4)
    plan.add_after_step("prox", lambda model, step: ..., order=10)
    summary = fit(model, spec, plan)          # trains model.gm in place, returns a JSON-able dict

One step, in this order (contributions of one kind run sorted by ``(order, insertion)``):

    outputs = model(inputs)   [through DistributedDataParallel when WORLD_SIZE > 1]
    loss    = task_loss(model, batch) + sum_k weight_k * loss_k(model, batch)
    loss.backward()                        [gradients averaged over processes]
    before_step_k(model, step)             gradient edits (grad of every process is identical here)
    clip_grad_norm_(grad_clip)             when grad_clip > 0
    optimizer.step()                       lr from the schedule
    after_step_k(model, step)              under no_grad: proximal steps, masks, projections

Parametrizations (``plan.add_parametrization``) replace a weight W by ``f(V)`` for the whole run
(V = f^-1(W) at the start, W = f(V) folded back at the end, so the graph after ``fit`` has the
same structure as before). The task loss is ``spec.loss`` unless a pass replaces it
(``plan.set_task_loss``); when it needs a teacher and none is given, the model as it is when
``fit`` starts is the teacher (distillation recovery after compression: pass the uncompressed
model as ``teacher=``).

Under ``torchrun --nproc_per_node N`` (or ``python -m torch.distributed.run``) ``fit`` joins a gloo
process group and each process trains on 1/N of every global batch (see ``regc._train_data``),
so N processes reach the weights of one process with the same ``batch_size`` (up to float
summation order; BatchNorm statistics are per process, as in any DDP run).

Recipe keys (``TrainSpec.from_file(path)`` reads a JSON object of them, ``from_options(dict)`` takes
strings from the CLI): the ``TrainSpec`` fields below. A relative ``.npz`` path in a recipe file is
relative to the recipe's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
import typing
from pathlib import Path
from typing import Any, Callable

import torch

from regc._train_data import open_source
from regc._train_loss import LOSSES, needs_teacher, resolve_loss
from regc._train_param import fold, install
from regc._train_run import dist_setup, load_checkpoint, lr_at, make_optimizer, progress_bar, save_checkpoint
from regc.errors import ConfigError, InputMismatchError
from regc.ir import Model
from regc.registry import _coerce, check_choice, check_range

__all__ = ["TrainSpec", "TrainPlan", "Batch", "Step", "fit", "planned_steps", "spec_for"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """How to train (the recipe keys).

    Attributes:
        data: an .npz path, 'package.module:function' returning batches, a regc.Dataset, or a DataLoader.
        loss: auto | ce | mse | distill | kd (auto: ce with int labels, mse with float labels, distill
            without labels).
        optimizer: sgd | adam | adamw.
        lr: learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 (sgd, adam) or decoupled (adamw) weight decay, >= 0.
        batch_size: global batch size (split over processes), >= 1.
        epochs: passes over the data when steps is 0, >= 1.
        steps: optimizer steps; 0 = use epochs.
        seed: seed of the data order and of dropout (process r uses seed + r for dropout).
        temperature: softmax temperature of loss=kd, > 0.
        schedule: constant | cosine (cosine decays lr to 0 over the run).
        grad_clip: clip the global gradient norm to this value; 0 = off.
        checkpoint: path of a checkpoint file written every checkpoint_every steps and at the end.
        checkpoint_every: steps between checkpoints; 0 = only at the end.
        resume: continue from the checkpoint file when it exists.
        progress: show a progress bar with ETA (None: when stderr is a terminal).
        train_mode: BatchNorm batch statistics and dropout on during the run (off: eval-mode fine-tuning).
    """

    data: Any = None
    loss: str = "auto"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1
    steps: int = 0
    seed: int = 0
    temperature: float = 1.0
    schedule: str = "constant"
    grad_clip: float = 0.0
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool | None = None
    train_mode: bool = True

    def __post_init__(self):
        check_choice("train", "loss", self.loss, LOSSES)
        check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train", "schedule", self.schedule, SCHEDULES)
        check_range("train", "lr", self.lr, 0.0, float("inf"), lo_open=True)
        check_range("train", "momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("train", "weight_decay", self.weight_decay, 0.0, float("inf"))
        check_range("train", "batch_size", self.batch_size, 1, float("inf"))
        check_range("train", "epochs", self.epochs, 1, float("inf"))
        check_range("train", "steps", self.steps, 0, float("inf"))
        check_range("train", "temperature", self.temperature, 0.0, float("inf"), lo_open=True)
        check_range("train", "grad_clip", self.grad_clip, 0.0, float("inf"))
        check_range("train", "checkpoint_every", self.checkpoint_every, 0, float("inf"))
        for name in ("batch_size", "epochs", "steps", "seed", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name} must be an int, got {getattr(self, name)!r}")
        if self.resume and not self.checkpoint:
            raise ConfigError("train.resume=true needs train.checkpoint (the file to resume from)")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "TrainSpec":
        """Build from a dict of recipe keys; string values (CLI) are converted by field type."""
        if not isinstance(options, dict):
            raise ConfigError(f"a training recipe must be a JSON object, got {type(options).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in options.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"train: unknown recipe key '{key}'{hint} Keys: {', '.join(names)}")
            kwargs[key] = value if key == "data" else _coerce("train", key, value, hints[key])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainSpec":
        """Read a JSON recipe; a relative .npz ``data`` path is taken relative to the recipe's folder."""
        path = Path(path)
        try:
            options = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the training recipe ({e})") from e
        data = options.get("data") if isinstance(options, dict) else None
        if isinstance(data, str) and data.endswith(".npz") and not Path(data).is_absolute():
            options["data"] = str(path.parent / data)
        return cls.from_options(options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (a non-string data source is shown by its type name)."""
        d = dataclasses.asdict(self)
        if not isinstance(self.data, (str, type(None))):
            d["data"] = f"<{type(self.data).__name__}>"
        return d


@dataclasses.dataclass
class Step:
    """Passed to before/after-step hooks. ``int(step)`` is the 0-based index of the step being taken."""

    index: int
    epoch: int
    lr: float
    rank: int
    world_size: int
    optimizer: torch.optim.Optimizer

    def __int__(self) -> int:
        return self.index

    def __index__(self) -> int:
        return self.index


@dataclasses.dataclass
class Batch:
    """What a loss term sees: this process's slice of the global batch and the outputs on it.

    ``index`` holds sample ids when the source provides them (a Dataset always does), ``outputs``
    the model's flat outputs (``output`` the first), ``teacher_outputs`` the teacher's (or None).
    ``forward(*inputs)`` runs the model again through the same (DDP) wrapper.
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None
    index: torch.Tensor | None
    outputs: tuple[torch.Tensor, ...]
    teacher_outputs: tuple[torch.Tensor, ...] | None
    step: int
    epoch: int
    forward: Callable[..., tuple[torch.Tensor, ...]]

    @property
    def output(self) -> torch.Tensor:
        return self.outputs[0]


@dataclasses.dataclass(frozen=True)
class _Item:
    kind: str
    name: str
    fn: Any
    order: int
    seq: int
    weight: float = 1.0
    target: str = ""


OptimizerFactory = Callable[[list[torch.nn.Parameter], TrainSpec], torch.optim.Optimizer]


class TrainPlan:
    """What passes contribute to one ``fit``: loss terms, gradient edits, after-step hooks,
    parametrizations, a replacement task loss or optimizer, and checkpointed state."""

    def __init__(self) -> None:
        self._items: list[_Item] = []
        self._states: dict[str, Any] = {}
        self.task_loss: tuple[str, Callable[[Model, Batch], torch.Tensor]] | None = None
        self.optimizer: tuple[str, OptimizerFactory] | None = None

    def _add(self, kind: str, name: str, fn: Any, order: int, **kw: Any) -> None:
        if any(i.name == name for i in self._items):
            raise ConfigError(f"train plan: a contribution named '{name}' is already in the plan")
        self._items.append(_Item(kind, name, fn, int(order), len(self._items), **kw))

    def add_loss(self, name: str, fn: Callable[[Model, Batch], torch.Tensor], weight: float = 1.0, *,
                 order: int = 0) -> None:
        """Add ``weight * fn(model, batch)`` (a scalar tensor) to the loss."""
        self._add("loss", name, fn, order, weight=float(weight))

    def add_before_step(self, name: str, fn: Callable[[Model, Step], None], *, order: int = 0) -> None:
        """Edit gradients (``p.grad``) after backward, before the optimizer step."""
        self._add("before_step", name, fn, order)

    def add_after_step(self, name: str, fn: Callable[[Model, Step], None], *, order: int = 0) -> None:
        """Run ``fn(model, step)`` under no_grad after each optimizer step (e.g. a proximal step)."""
        self._add("after_step", name, fn, order)

    def add_parametrization(self, name: str, target: str, module: torch.nn.Module, *, order: int = 0) -> None:
        """Train parameter ``target`` as ``module(V)``; ``module.right_inverse(W)`` (if defined) sets V.
        Several on one target compose in ``order`` (the lowest is applied first to V)."""
        self._add("param", name, module, order, target=target)

    def set_task_loss(self, name: str, fn: Callable[[Model, Batch], torch.Tensor]) -> None:
        """Replace ``spec.loss`` (e.g. PS-KD's soft targets, StableMax)."""
        if self.task_loss is not None:
            raise ConfigError(f"train plan: '{name}' and '{self.task_loss[0]}' both replace the task loss")
        self.task_loss = (name, fn)

    def set_optimizer(self, name: str, factory: OptimizerFactory) -> None:
        """Replace ``spec.optimizer`` with ``factory(params, spec)``."""
        if self.optimizer is not None:
            raise ConfigError(f"train plan: '{name}' and '{self.optimizer[0]}' both set the optimizer")
        self.optimizer = (name, factory)

    def add_state(self, name: str, obj: Any) -> None:
        """Checkpoint ``obj.state_dict()`` (tensors/numbers) and restore it with ``obj.load_state_dict``."""
        self._states[name] = obj

    def items(self, kind: str) -> list[_Item]:
        return sorted((i for i in self._items if i.kind == kind), key=lambda i: (i.order, i.seq))

    def describe(self) -> list[dict[str, Any]]:
        """The contributions in run order, for stats."""
        out = [{"kind": i.kind, "name": i.name, "order": i.order}
               for k in ("param", "loss", "before_step", "after_step") for i in self.items(k)]
        for kind, slot in (("task_loss", self.task_loss), ("optimizer", self.optimizer)):
            if slot is not None:
                out.append({"kind": kind, "name": slot[0]})
        return out


def spec_for(ctx: Any, pass_name: str, **defaults: Any) -> TrainSpec:
    """The pass's training spec: ``ctx.train`` if set, else ``TrainSpec(data=ctx.data, **defaults)``."""
    if getattr(ctx, "train", None) is not None:
        if not isinstance(ctx.train, TrainSpec):
            raise ConfigError(f"pass '{pass_name}': ctx.train must be a regc.train.TrainSpec, "
                              f"got {type(ctx.train).__name__}")
        return ctx.train
    if getattr(ctx, "data", None) is None:
        raise ConfigError(f"pass '{pass_name}' trains the model and needs data: pass --data DATA.npz or "
                          "--train RECIPE.json on the CLI, or data=... / ctx.train=TrainSpec(...) in Python")
    return TrainSpec(data=ctx.data, **defaults)


def fit(model: Model, spec: TrainSpec, plan: TrainPlan | None = None, *, teacher: Model | None = None
        ) -> dict[str, Any]:
    """Train ``model`` in place (through ``model.gm``) and return a JSON-able summary:
    ``steps, epochs, seconds, world_size, rank, loss_first, loss_last, history`` (``[step, loss]``, at most
    ~200 points), ``terms`` (mean of each loss term over the last epoch), ``resumed_from``, ``spec``,
    ``plan``. BatchNorm/dropout are switched on for the run (unless ``spec.train_mode`` is false) and off
    after it."""
    if not isinstance(model, Model):
        raise ConfigError(f"fit expects a regc.Model, got {type(model).__name__}")
    plan = plan or TrainPlan()
    rank, world = dist_setup()
    holders: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + rank)
            return _fit(model, spec, plan, teacher, rank, world, holders)
    finally:
        model.train_mode(False)
        for name in holders:
            getattr(model.gm, name).train(False)
            fold(model, name)


def planned_steps(model: Model, spec: TrainSpec, who: str) -> int:
    """The optimizer steps ``fit(model, spec)`` will run (for passes that schedule over the run); a
    ``ConfigError`` naming ``who`` when the data source has no length and ``spec.steps`` is unset."""
    rank, world = dist_setup()
    total = _total_steps(spec, open_source(spec.data, model, spec.batch_size, spec.seed, rank, world))
    if total is None:
        raise ConfigError(f"{who} schedules over the whole run and cannot count the steps of this data "
                          "source: set train.steps")
    return total


def _total_steps(spec: TrainSpec, source: Any) -> int | None:
    return spec.steps or (spec.epochs * source.steps_per_epoch if source.steps_per_epoch else None)


def _fit(model: Model, spec: TrainSpec, plan: TrainPlan, teacher: Model | None, rank: int, world: int,
         holders: list[str]) -> dict[str, Any]:
    source = open_source(spec.data, model, spec.batch_size, spec.seed, rank, world)
    total = _total_steps(spec, source)
    first = next(iter(source.epoch(0)), None)
    if first is None:
        raise ConfigError("train: the data source yields no batches")
    try:
        model.check_inputs(first.inputs)
    except InputMismatchError as e:
        raise InputMismatchError(f"train batches do not fit the model ({e}); with a static batch size set "
                                 "train.batch_size to it times the number of processes") from e
    if plan.task_loss is not None:
        task = plan.task_loss[1]
    else:
        task = resolve_loss(spec.loss, first.labels, spec.temperature)
    if teacher is None and plan.task_loss is None and needs_teacher(spec.loss, first.labels is not None):
        teacher = model.clone()
    if teacher is not None:
        teacher.train_mode(False)

    by_target: dict[str, list[Any]] = {}
    for it in plan.items("param"):
        by_target.setdefault(it.target, []).append(it.fn)
    for target, fns in by_target.items():
        holders.append(install(model, target, fns))

    params = [p for p in model.gm.parameters() if p.requires_grad]
    opt = plan.optimizer[1](params, spec) if plan.optimizer else make_optimizer(spec.optimizer, params, spec)
    step, epoch, skip, resumed, hist = 0, 0, 0, None, []
    if spec.resume and spec.checkpoint and Path(spec.checkpoint).is_file():
        state = load_checkpoint(spec.checkpoint)
        _restore(model, opt, plan, state, spec.checkpoint)
        step, epoch, skip, resumed = state["step"], state["epoch"], state["batch"], state["step"]
        hist = [list(map(float, r)) for r in state["history"].tolist()]

    model.train_mode(spec.train_mode)
    for name in holders:
        getattr(model.gm, name).train(True)
    net: torch.nn.Module = model.gm
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model.gm)

    def forward(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.utils._pytree.tree_flatten(net(*xs))[0])

    names = ["loss", "task", *[i.name for i in plan.items("loss")]]
    epoch_sums = torch.zeros(len(names), dtype=torch.float64)
    epoch_n = 0
    t0 = time.perf_counter()
    done = total is not None and step >= total
    with progress_bar(spec.progress, rank, total, step) as bar:
        while not done:
            batches = 0
            for bi, raw in enumerate(source.epoch(epoch)):
                batches += 1
                if bi < skip:
                    continue
                lr = lr_at(spec, step, total)
                for g in opt.param_groups:  # the schedule scales each group's own initial lr
                    g["lr"] = g.setdefault("initial_lr", g["lr"]) * lr / spec.lr
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher.run(*raw.inputs)
                outputs = forward(*raw.inputs)
                batch = Batch(raw.inputs, raw.labels, raw.index, outputs, t_out, step, epoch, forward)
                vals = _step(model, plan, task, batch, Step(step, epoch, lr, rank, world, opt), params,
                             spec.grad_clip)
                if world > 1:
                    torch.distributed.all_reduce(vals)
                    vals /= world
                epoch_sums += vals
                epoch_n += 1
                hist.append([step, float(vals[0])])
                step, skip = step + 1, bi + 1
                bar.update(completed=step, loss=f"loss {float(vals[0]):.4g}")
                if spec.checkpoint and spec.checkpoint_every and step % spec.checkpoint_every == 0:
                    _save(spec.checkpoint, model, opt, plan, step, epoch, skip, hist, rank)
                if total is not None and step >= total:
                    done = True
                    break
            if batches == 0:
                raise ConfigError("train: the data source yielded no batches in epoch "
                                  f"{epoch} (a one-shot iterator serves one epoch: give a DataLoader, "
                                  "a Dataset or 'module:function')")
            if not done:
                epoch, skip = epoch + 1, 0
                done = total is None and epoch >= spec.epochs
                if not done:
                    epoch_sums.zero_()
                    epoch_n = 0
    if spec.checkpoint:
        _save(spec.checkpoint, model, opt, plan, step, epoch, skip, hist, rank)
    means = (epoch_sums / max(epoch_n, 1)).tolist()
    stride = max(1, len(hist) // 200)
    return {
        "steps": step,
        "epochs": round(step / source.steps_per_epoch, 3) if source.steps_per_epoch else epoch,
        "seconds": round(time.perf_counter() - t0, 3),
        "world_size": world,
        "rank": rank,
        "loss_first": hist[0][1] if hist else None,
        "loss_last": hist[-1][1] if hist else None,
        "history": hist[::stride],
        "terms": dict(zip(names, means, strict=True)),
        "resumed_from": resumed,
        "spec": spec.to_dict(),
        "plan": plan.describe(),
    }


def _step(model: Model, plan: TrainPlan, task: Callable[[Model, Batch], torch.Tensor], batch: Batch,
          info: Step, params: list[torch.nn.Parameter], grad_clip: float) -> torch.Tensor:
    """One optimizer step in the documented order; returns [loss, task, *terms] (float64)."""
    task_val = task(model, batch)
    terms = [i.weight * i.fn(model, batch) for i in plan.items("loss")]
    loss = task_val + sum(terms)
    info.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for it in plan.items("before_step"):
        it.fn(model, info)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    info.optimizer.step()
    with torch.no_grad():
        for it in plan.items("after_step"):
            it.fn(model, info)
    return torch.stack([torch.as_tensor(v).detach().double() for v in (loss, task_val, *terms)])


def _save(path: str, model: Model, opt: torch.optim.Optimizer, plan: TrainPlan, step: int, epoch: int,
          batch: int, hist: list, rank: int) -> None:
    if rank != 0:
        return
    save_checkpoint(path, {
        "step": step, "epoch": epoch, "batch": batch,
        "model": model.gm.state_dict(), "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "states": {k: v.state_dict() for k, v in plan._states.items()},
        "history": torch.tensor(hist, dtype=torch.float64).reshape(-1, 2),
    })


def _restore(model: Model, opt: torch.optim.Optimizer, plan: TrainPlan, state: dict, path: str) -> None:
    mine = {(k, tuple(v.shape)) for k, v in model.gm.state_dict().items()}
    theirs = {(k, tuple(v.shape)) for k, v in state["model"].items()}
    if mine != theirs:
        diff = sorted(mine ^ theirs)[:4]
        raise ConfigError(f"{path}: the checkpoint holds other tensors than this model and plan "
                          f"(e.g. {diff}); resume with the same model and passes, or delete the file")
    model.gm.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    for k, obj in plan._states.items():
        if k in state["states"]:
            obj.load_state_dict(state["states"][k])
