"""Calibration / training samples: named arrays with a leading sample axis.

``--data DATA.npz`` holds one array per model input (key = input name) and optionally ``labels``.
Loaded with ``allow_pickle=False``: an npz never runs code.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from regc.errors import ConfigError, InputMismatchError, ModelFormatError

__all__ = ["Dataset", "load_npz"]


@dataclasses.dataclass
class Dataset:
    """``inputs[name]`` arrays share their first (sample) axis; ``labels`` is optional."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    def __post_init__(self):
        sizes = {k: v.shape[0] for k, v in self.inputs.items()}
        if self.labels is not None:
            sizes["labels"] = self.labels.shape[0]
        if not sizes:
            raise ConfigError("data holds no arrays")
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"data arrays differ in sample count: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray | torch.Tensor], input_names: Sequence[str]) -> "Dataset":
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise InputMismatchError(
                f"data has keys {sorted(arrays)}, the model's inputs are {list(input_names)}: missing {missing}"
            )
        unknown = sorted(set(arrays) - set(input_names) - {"labels"})
        if unknown:
            raise InputMismatchError(
                f"data has keys {unknown} that are neither model inputs {list(input_names)} nor 'labels'")
        inputs = {n: torch.as_tensor(np.asarray(arrays[n])) for n in input_names}
        labels = torch.as_tensor(np.asarray(arrays["labels"])) if "labels" in arrays else None
        return cls(inputs, labels)

    def check(self, model) -> None:
        """Raise InputMismatchError unless one sample batch fits ``model``'s inputs."""
        model.check_inputs(self.batch(0, min(len(self), model.example_inputs[0].shape[0] or 1),
                                      like=model.example_inputs))

    def batch(self, start: int, stop: int, like: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        out = []
        for i, t in enumerate(self.inputs.values()):
            b = t[start:stop]
            if like is not None and b.dtype != like[i].dtype:
                b = b.to(like[i].dtype)
            out.append(b)
        return tuple(out)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                like: Sequence[torch.Tensor] | None = None
                ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        """Yield (inputs, labels-or-None) mini-batches; ``like`` casts inputs to the model's dtypes."""
        n = len(self)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            sel = idx[s:s + batch_size]
            xs = tuple(t[sel] if like is None else t[sel].to(like[i].dtype)
                       for i, t in enumerate(self.inputs.values()))
            yield xs, (self.labels[sel] if self.labels is not None else None)


def load_npz(path: str | Path, input_names: Sequence[str]) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: data file not found (expected an .npz with one array per model input)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ModelFormatError(f"{path}: not a readable .npz of plain arrays ({e})") from e
    return Dataset.from_arrays(arrays, input_names)
