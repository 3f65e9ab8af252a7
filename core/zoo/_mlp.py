"""A three-layer perceptron: the smallest zoo model, for fast pass and contract tests."""

from __future__ import annotations

import torch
from torch import nn

from regc.zoo._common import ZooModel, seeded


class MLP(nn.Module):
    """``Linear -> ReLU -> Linear -> ReLU -> Linear`` on flat feature vectors."""

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def mlp(in_features: int = 32, hidden: int = 64, num_classes: int = 10, seed: int = 0) -> ZooModel:
    """An MLP on a (4, in_features) float32 batch ``x``; output ``logits``; dynamic batch."""
    with seeded(seed):
        module = MLP(in_features, hidden, num_classes).eval()
        x = torch.randn(4, in_features)
    return ZooModel(
        name="mlp",
        module=module,
        example_inputs=(x,),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
