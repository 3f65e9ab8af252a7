"""CQAP, EQ-Net's conditional quantization-aware accuracy predictor (TECHNIQUES.md 5.5, Eq. 9):
acc = MLP(G_w, S_w, S_a | B_w, B_a).

Encoding (binary one-hot): 6 condition slots [per_channel, per_tensor, w_sym, w_asym, a_sym, a_asym]
(the official OQAEncoder writes 0 into both asym slots, so asymmetry is never encoded: not copied),
then a 7-way one-hot (bits 2..8) of the weight bits and of the activation bits of every elastic layer
(fixed first/last layers are not encoded). MLP: ``depth`` hidden Linear+ReLU layers of ``hidden``
units, a last Linear without bias, plus ``base`` (the mean training accuracy); SmoothL1 loss, Adam.

Kendall tau-b over pairs i < j: (concordant - discordant) / sqrt(n_a n_b), n_a / n_b = the pairs not
tied in a / in b (measured accuracies tie often: a few hundred evaluation samples).
"""

from __future__ import annotations

import math

import torch

from regc.passes._eqnet_quant import SubnetConfig

__all__ = ["encode", "Predictor", "train_predictor", "kendall_tau", "pearson"]


def encode(cfgs: list[SubnetConfig], free: list[bool]) -> torch.Tensor:
    """(len(cfgs), 6 + 14 * elastic layers) float32 features."""
    idx = [i for i, f in enumerate(free) if f]
    rows = []
    for c in cfgs:
        row = torch.zeros(6 + 14 * len(idx))
        row[0 if c.w_channel else 1] = 1
        row[2 if c.w_sym else 3] = 1
        row[4 if c.a_sym else 5] = 1
        for j, i in enumerate(idx):
            row[6 + 14 * j + c.w_bits[i] - 2] = 1
            row[6 + 14 * j + 7 + c.a_bits[i] - 2] = 1
        rows.append(row)
    return torch.stack(rows)


class Predictor(torch.nn.Module):
    def __init__(self, features: int, hidden: int, depth: int, base: float):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = features
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, 1, bias=False))
        self.mlp = torch.nn.Sequential(*layers)
        self.register_buffer("base", torch.tensor(float(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1) + self.base


def train_predictor(x: torch.Tensor, y: torch.Tensor, hidden: int, depth: int, epochs: int, lr: float,
                    seed: int) -> Predictor:
    """Fit a CQAP on features ``x`` and accuracies ``y`` (full batch, Adam, SmoothL1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Predictor(x.shape[1], hidden, depth, float(y.mean()))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        loss = torch.nn.functional.smooth_l1_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    n = a.numel()
    if n < 2:
        return float("nan")
    iu = torch.triu_indices(n, n, offset=1)
    da, db = torch.sign(a[iu[0]] - a[iu[1]]), torch.sign(b[iu[0]] - b[iu[1]])
    den = math.sqrt(float((da != 0).sum()) * float((db != 0).sum()))
    return float((da * db).sum()) / den if den > 0 else float("nan")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")
