"""Batch sources for ``regc.train``: resolve a data spec, normalize batches, shard them over ranks.

A data spec is one of
    a ``regc.Dataset``                 shuffled per epoch with ``seed + epoch``; batches carry sample indices
    "path/to/data.npz"                 loaded as a ``regc.Dataset`` (keys = input names, optional 'labels')
    "package.module:function"          ``function()`` returns an iterable of batches (called once per epoch)
    a torch ``DataLoader`` / iterable  iterated once per epoch (a one-shot iterator serves one epoch)

A batch from an iterable is a tensor (the only input), a tuple/list ``(inputs..., [labels])`` or a
dict ``{input_name: tensor, "labels": tensor, "index": tensor}`` ("index" = sample ids, needed by
per-sample regularizers such as SAF and PS-KD).

Sharding over ``world`` ranks keeps the *global* batch the same as on one process:
    Dataset:  each global batch of ``batch_size`` samples is cut to a multiple of ``world`` and rank r
              takes the r-th contiguous slice (equal slices, so the mean of rank means = global mean);
              a short last batch is dropped when the model was captured with a static batch size;
    iterable: ``world`` consecutive batches form one global step; rank r takes the r-th of them.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from regc.data import Dataset, load_npz
from regc.errors import ConfigError, InputMismatchError

__all__ = ["RawBatch", "Source", "open_source"]


@dataclasses.dataclass
class RawBatch:
    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None
    index: torch.Tensor | None


class Source:
    """Per-epoch batches for one rank. ``steps_per_epoch`` is None when the iterable has no length."""

    def __init__(self, data: Any, model, batch_size: int, seed: int, rank: int, world: int):
        self.model, self.batch_size, self.seed, self.rank, self.world = model, batch_size, seed, rank, world
        self.data = data
        # a model captured with a static batch dim takes only full batches
        self.min_part = batch_size if 0 not in model.dynamic_dims(model.input_names[0]) else world
        if isinstance(data, Dataset):
            n = len(data)
            if batch_size < world:
                raise ConfigError(f"train.batch_size={batch_size} is smaller than the {world} processes")
            self.steps_per_epoch: int | None = n // batch_size + int(n % batch_size >= self.min_part)
            if self.steps_per_epoch == 0:
                raise ConfigError(f"train data has {n} samples, fewer than the {world} processes")
        else:
            length = _len_or_none(data)
            self.steps_per_epoch = None if length is None else length // world
            if self.steps_per_epoch == 0:
                raise ConfigError(f"train data yields {length} batches, fewer than the {world} processes")

    def epoch(self, epoch: int) -> Iterator[RawBatch]:
        if isinstance(self.data, Dataset):
            yield from self._dataset_epoch(epoch)
            return
        items = self.data() if callable(self.data) and not hasattr(self.data, "__iter__") else self.data
        group: list[Any] = []
        for item in items:
            group.append(item)
            if len(group) == self.world:
                yield self._normalize(group[self.rank])
                group = []

    def _dataset_epoch(self, epoch: int) -> Iterator[RawBatch]:
        ds, like = self.data, self.model.example_inputs
        n = len(ds)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        for s in range(0, n, self.batch_size):
            sel = perm[s:s + self.batch_size]
            sel = sel[: len(sel) - len(sel) % self.world]
            if len(sel) < self.min_part:
                continue
            k = len(sel) // self.world
            sel = sel[self.rank * k:(self.rank + 1) * k]
            xs = tuple(t[sel].to(like[i].dtype) for i, t in enumerate(ds.inputs.values()))
            yield RawBatch(xs, ds.labels[sel] if ds.labels is not None else None, sel)

    def _normalize(self, item: Any) -> RawBatch:
        names = self.model.input_names
        like = self.model.example_inputs
        labels = index = None
        if isinstance(item, torch.Tensor):
            xs: Sequence[Any] = (item,)
        elif isinstance(item, dict):
            missing = [n for n in names if n not in item]
            if missing:
                raise InputMismatchError(f"train batch has keys {sorted(item)}, missing inputs {missing}")
            xs = [item[n] for n in names]
            labels, index = item.get("labels"), item.get("index")
        elif isinstance(item, (tuple, list)):
            if len(item) == len(names) + 1:
                xs, labels = item[:-1], item[-1]
            elif len(item) == len(names):
                xs = item
            else:
                raise InputMismatchError(
                    f"train batch is a sequence of {len(item)} items; the model takes {len(names)} inputs "
                    f"{names} (give inputs, or inputs followed by labels)")
        else:
            raise InputMismatchError(
                f"train batch must be a tensor, tuple/list or dict of tensors, got {type(item).__name__}")
        xs = tuple(torch.as_tensor(x).to(e.dtype) for x, e in zip(xs, like, strict=True))
        return RawBatch(xs, None if labels is None else torch.as_tensor(labels),
                        None if index is None else torch.as_tensor(index))


def open_source(data: Any, model, batch_size: int, seed: int, rank: int, world: int,
                base_dir: Path | None = None) -> Source:
    """Resolve ``data`` (see the module docstring) into a ``Source`` for this rank."""
    if data is None:
        raise ConfigError("train: no data: set TrainSpec(data=...) (an .npz, 'module:function' or a "
                          "DataLoader) or pass data=... to regc.compress")
    if isinstance(data, (str, Path)):
        data = _resolve_str(str(data), model, base_dir)
    elif isinstance(data, Iterator):
        raise ConfigError("train.data is a one-shot iterator, which cannot serve several epochs: give a "
                          "DataLoader, a list of batches, a Dataset or 'module:function'")
    elif not isinstance(data, Dataset) and not isinstance(data, Iterable):
        raise ConfigError(f"train.data must be a Dataset, an .npz path, 'module:function' or an iterable of "
                          f"batches, got {type(data).__name__}")
    return Source(data, model, batch_size, seed, rank, world)


def _resolve_str(text: str, model, base_dir: Path | None) -> Any:
    if text.endswith(".npz"):
        path = Path(text)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return load_npz(path, model.input_names)
    mod_name, sep, fn_name = text.partition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise ConfigError(f"train.data '{text}' is neither an .npz file nor 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.data '{text}': cannot import {fn_name} from {mod_name} ({e})") from e
    if not callable(fn):
        raise ConfigError(f"train.data '{text}' is not callable")
    return fn


def _len_or_none(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
