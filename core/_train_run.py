"""Plumbing of the ``regc.train`` loop: process group, optimizer and schedule, checkpoints, progress.

Checkpoints are ``torch.save`` of a plain dict (tensors, numbers, strings, lists, dicts) read back
with ``torch.load(weights_only=True)``: a checkpoint never runs code. Written by rank 0 to a
temporary file that then replaces the target (no half-written checkpoint after a crash).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from regc.errors import ConfigError

__all__ = ["dist_setup", "make_optimizer", "lr_at", "save_checkpoint", "load_checkpoint", "progress_bar"]

CKPT_FORMAT = "regc-train-1"


def dist_setup() -> tuple[int, int]:
    """(rank, world_size): joins torchrun's gloo group when WORLD_SIZE > 1. The group is created once
    per process and kept for later fits (re-creating a gloo mesh right after destroying one races
    between ranks); it is destroyed at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        atexit.register(_destroy_group)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def make_optimizer(kind: str, params: list[torch.nn.Parameter], spec: Any) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError("train: the model has no trainable parameters")
    if kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_at(spec: Any, step: int, total: int | None) -> float:
    """constant: lr;  cosine: lr * (1 + cos(pi * step / total)) / 2."""
    if spec.schedule == "constant" or not total:
        return spec.lr
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save({"format": CKPT_FORMAT, **state}, tmp)
    os.replace(tmp, p)


def load_checkpoint(path: str) -> dict[str, Any]:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ConfigError(f"{path}: not a regc training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{path}: not a regc training checkpoint (format {CKPT_FORMAT} expected)")
    return state


class _NoBar:
    def update(self, **kw: Any) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *a: Any) -> None:
        pass


class _RichBar:
    """A rich progress bar with elapsed time, ETA and the running loss."""

    def __init__(self, total: int | None, done: int):
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"),
                                 transient=False)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="")

    def update(self, **kw: Any) -> None:
        self.progress.update(self.task, **kw)

    def __enter__(self) -> "_RichBar":
        self.progress.start()
        return self

    def __exit__(self, *a: Any) -> None:
        self.progress.stop()


def progress_bar(enabled: bool | None, rank: int, total: int | None, done: int) -> Any:
    """A bar on rank 0 when ``enabled`` (None: when stderr is a terminal)."""
    on = sys.stderr.isatty() if enabled is None else enabled
    return _RichBar(total, done) if on and rank == 0 else _NoBar()
