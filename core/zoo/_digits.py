"""A small CNN trained on scikit-learn's 8x8 handwritten digits: the zoo's one model with a real
accuracy to protect, and the README's bundled example; and a 3-layer MLP on the same data (for
experiments that want a model without convolutions or BatchNorm).

Training is deterministic (seeded, single-threaded, fixed split) and takes a few seconds on a CPU;
the trained weights are kept in memory for the rest of the process, never written to disk.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regc.zoo._common import ZooModel, seeded

_SEED = 0
_EPOCHS = 10
_BATCH = 128
_LR = 1e-2


class DigitsData(NamedTuple):
    """The fixed digits split: images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class DigitsMLP(nn.Module):
    """``flatten -> linear 64-128 -> ReLU -> linear 128-128 -> ReLU -> linear 128-10``:
    (N, 1, 8, 8) images -> (N, 10) logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class DigitsCNN(nn.Module):
    """``[conv3x3-BN-ReLU-maxpool] x 2 -> linear``: (N, 1, 8, 8) images -> (N, 10) logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 2 * 2, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image).flatten(1))


@functools.cache
def _split_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return tuple(train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=_SEED, stratify=y))


def digits_data() -> DigitsData:
    """The fixed split of ``sklearn.datasets.load_digits``: 1437 train and 360 test images, stratified.

    Fresh tensors on every call (callers may modify them).
    """
    x_train, x_test, y_train, y_test = (torch.tensor(a) for a in _split_arrays())
    return DigitsData(x_train, y_train, x_test, y_test)


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of the logits ``model(x)`` against labels ``y``.

    ``model`` is anything callable on a batch: an eval-mode module, a ``regc.Model``, a compiled artifact.
    """
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, so float reductions sum in the same order on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(module: nn.Module, epochs: int, batch: int, lr: float, one_cycle: bool) -> dict[str, torch.Tensor]:
    """Train ``module`` on the training split (Adam, cross-entropy, one thread; the caller seeds);
    return its state_dict."""
    data = digits_data()
    n = len(data.x_train)
    with _single_thread():
        model = module.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * -(-n // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps) if one_cycle else None
        for _ in range(epochs):
            for idx in torch.randperm(n).split(batch):
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    """``DigitsCNN`` trained with Adam and a one-cycle learning rate."""
    with seeded(_SEED):
        return _fit(DigitsCNN(), _EPOCHS, _BATCH, _LR, one_cycle=True)


def digits_cnn(trained: bool = True) -> ZooModel:
    """The digits CNN (trained unless ``trained=False``) on 8 training images ``image``; output
    ``logits``; dynamic batch. The first call trains (a few seconds); later calls reuse the weights."""
    with seeded(_SEED):
        module = DigitsCNN()
    if trained:
        module.load_state_dict(_trained_state())
    return ZooModel(
        name="digits_cnn",
        module=module.eval(),
        example_inputs=(digits_data().x_train[:8],),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
    )


@functools.cache
def _mlp_state() -> dict[str, torch.Tensor]:
    """``DigitsMLP`` trained 30 epochs, Adam 1e-3 (constant), batch 64."""
    with seeded(_SEED):
        return _fit(DigitsMLP(), 30, 64, 1e-3, one_cycle=False)


def digits_mlp() -> ZooModel:
    """The trained ``DigitsMLP`` (97.2% test accuracy), named like ``digits_cnn``: input ``image``, output
    ``logits``, dynamic batch. The first call trains it (a few seconds)."""
    with seeded(_SEED):
        module = DigitsMLP()
    module.load_state_dict(_mlp_state())
    return ZooModel(name="digits_mlp", module=module.eval(), example_inputs=(digits_data().x_train[:8],),
                    input_names=["image"], output_names=["logits"],
                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
