"""What every zoo builder shares: the ``ZooModel`` record and deterministic construction helpers."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model ready to capture with ``torch.export.export(module, example_inputs, dynamic_shapes=...)``.

    Attributes:
        name: the zoo name (a key of ``regc.zoo.ZOO``, or "minilm").
        module: the eager module, in eval mode.
        example_inputs: positional inputs of ``module``; real data where the model has any.
        input_names: one per input, equal to the parameter names of ``module.forward``.
        output_names: one per output.
        dynamic_shapes: ``{input_name: {dim: torch.export.Dim}}``, or None when all shapes are static.
    """

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, dict[int, Any]] | None = None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for the block, and give the caller's RNG state back after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_norm_affine(module: nn.Module) -> None:
    """Draw the affine parameters of every BatchNorm2d and LayerNorm around (weight 1, bias 0).

    Untrained norms are an identity in disguise; this makes folding or fusing them a real test.
    Uses the global RNG: call it inside ``seeded``.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def calibrate_batchnorm(module: nn.Module, calib: torch.Tensor) -> None:
    """Set BatchNorm running statistics to those of ``calib`` (one train-mode pass, cumulative average).

    Keeps the activations of an untrained deep CNN well scaled. Leaves ``module`` in eval mode.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        module.train()(calib)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    module.eval()
