"""Calibration for `quant`: observe activations on sample batches and choose their int8 ranges.

``observe`` runs the graph (a ``torch.fx.Interpreter``) over the batches and keeps, per watched node,
the global min/max, the per-channel max |x| over the last axis (for SmoothQuant), and a uniform random
subsample of values. ``choose_range`` turns that into [lo, hi]:
    minmax:     [min, max]
    percentile: the (100-p)% and p% quantiles of the sample (p = 99.99 by default)
    mse:        [r min, r max] with r in {1, 0.98, ..., 0.3} minimizing E[(fq(x) - x)^2] on the sample
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from regc.passes._qdq import act_qparams, fake_quant_static

__all__ = ["ActStats", "observe", "choose_range", "calib_batches"]

_SAMPLE_PER_BATCH = 1 << 14
_SAMPLE_MAX = 1 << 17


@dataclasses.dataclass
class ActStats:
    lo: float = float("inf")
    hi: float = float("-inf")
    channel_absmax: torch.Tensor | None = None
    samples: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def update(self, x: torch.Tensor, gen: torch.Generator) -> None:
        x = x.detach().float()
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())
        cmax = x.abs().reshape(-1, x.shape[-1]).amax(0) if x.dim() >= 1 else x.abs().reshape(1)
        prev = self.channel_absmax
        self.channel_absmax = cmax if prev is None else torch.maximum(prev, cmax)
        flat = x.reshape(-1)
        if flat.numel() > _SAMPLE_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (_SAMPLE_PER_BATCH,), generator=gen)]
        if sum(s.numel() for s in self.samples) < _SAMPLE_MAX:
            self.samples.append(flat.clone())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


class _Observer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, stats: dict[fx.Node, ActStats], gen: torch.Generator):
        super().__init__(gm)
        self.stats, self.gen = stats, gen

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.stats and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.stats[n].update(out, self.gen)
        return out


def calib_batches(data, like: Sequence[torch.Tensor], batch_size: int, limit: int, static_batch: bool
                  ) -> tuple[list[tuple], torch.Tensor | None]:
    """Up to ``limit`` samples of ``data`` as input tuples, and their labels when the data has them
    (the example inputs, unlabelled, when data is None). A static batch dim keeps only full batches."""
    if data is None:
        return [tuple(like)], None
    out, labels, seen = [], [], 0
    for xs, ys in data.batches(batch_size, like=like):
        n = min(xs[0].shape[0], limit - seen)
        if static_batch and n != batch_size:
            break
        out.append(tuple(x[:n] for x in xs))
        if ys is not None:
            labels.append(ys[:n])
        seen += n
        if seen >= limit:
            break
    return out, (torch.cat(labels) if labels else None)


def observe(gm: fx.GraphModule, nodes: Iterable[fx.Node], batches: list[tuple], seed: int = 0
            ) -> dict[fx.Node, ActStats]:
    stats = {n: ActStats() for n in nodes}
    gen = torch.Generator().manual_seed(seed)
    interp = _Observer(gm, stats, gen)
    with torch.no_grad():
        for xs in batches:
            interp.run(*xs)
    return {n: s for n, s in stats.items() if s.channel_absmax is not None}


def choose_range(st: ActStats, method: str, percentile: float) -> tuple[float, float]:
    if method == "minmax":
        return st.lo, st.hi
    x = st.sample()
    if method == "percentile":
        q = torch.quantile(x, torch.tensor([1 - percentile / 100, percentile / 100]))
        return min(q[0].item(), 0.0), max(q[1].item(), 0.0)
    best, best_err = (st.lo, st.hi), float("inf")
    for i in range(36):
        r = 1.0 - 0.02 * i
        scale, zp = act_qparams(r * st.lo, r * st.hi)
        err = (fake_quant_static(x, scale, zp) - x).pow(2).mean().item()
        if err < best_err:
            best, best_err = (r * st.lo, r * st.hi), err
    return best
