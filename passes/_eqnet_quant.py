"""EQ-Net's elastic quantizer: one shared weight (or activation), a separate learnable LSQ+ scale s and
offset beta per bit-width b in 2..8, per symmetry and, for weights, per granularity (TECHNIQUES.md 5.1).

    v = clamp((x - beta) / s, Q_n, Q_p),    x_bar = round_ste(v) s + beta        (beta = 0: symmetric)

Ranges: weights signed [-2^(b-1), 2^(b-1) - 1]; activations unsigned [0, 2^b - 1] when the
calibration batch has min >= -1e-9 (post-ReLU), else signed. Gradients (straight-through round;
``v`` before the clamp, ``inside`` = Q_n <= v <= Q_p):

    d x_bar / d x    = inside
    d x_bar / d s    = c (round(v) - v) if inside, c Q_n below, c Q_p above
    d x_bar / d beta = c (1 - inside)

with the LSQ gradient scale c = 1 / sqrt(Q_p N) applied through g(t) = (t - c t).detach() + c t
(value t, gradient c; an autograd function here, so the value is t bit for bit). N = numel for a
per-tensor scale and the elements of one channel for a per-channel scale (the official code uses
2 / sqrt(Q_p numel / size(1)), dividing by the input channels: not copied; its constant factor 2
would change nothing under Adam but the eps and the value clip). The
official code's g returns |t|, which forces the offset beta >= 0; here beta keeps its sign and only
s is taken as |s| (floored at 1e-8).

Init: for each bit-width in the elastic space, a grid of clipping factors a = 1 - 0.01 i (i < 80;
i < 5 for symmetric per-channel) minimizing mean |x - Q(x)|^2.4 on one calibration batch
(per channel for per-channel scales; activations: min/max of the whole batch, the error on an evenly
strided subsample of at most ~8192 elements). Symmetric: s = a max|x| / Q_p (unsigned activations:
a max(x) / Q_p); asymmetric: s = a (max - min) / (Q_p - Q_n), beta = a min - Q_n s.
Seven slots per quantity are always kept (b = 2..8, index b - 2), so a checkpoint holds every
bit-width; only the bit-widths of the elastic space are initialized and trained.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["BITS", "SubnetConfig", "round_ste", "grad_scale", "lsq_fake_quant", "qrange", "WeightQuantizer",
           "ActQuantizer"]

BITS = tuple(range(2, 9))
_ERR_POWER = 2.4
_INIT_ELEMENTS = 8192


@dataclasses.dataclass(frozen=True)
class SubnetConfig:
    """One subnet of the elastic space: global conditions and per-layer bit-widths."""

    w_channel: bool                 # weight granularity: per-channel (True) or per-tensor
    w_sym: bool                     # weight symmetry
    a_sym: bool                     # activation symmetry
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"weights": "per_channel" if self.w_channel else "per_tensor",
                "weight_symmetry": "sym" if self.w_sym else "asym",
                "act_symmetry": "sym" if self.a_sym else "asym",
                "w_bits": list(self.w_bits), "a_bits": list(self.a_bits)}


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, c):
        ctx.c = c
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return _RoundSTE.apply(x)


def grad_scale(t: torch.Tensor, c: float) -> torch.Tensor:
    """Value exactly t, gradient c * (upstream gradient): the LSQ g(t) = (t - c t).detach() + c t without
    its floating-point rounding, so evaluation and the lowered integer graph see the same s."""
    return _GradScale.apply(t, c)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq_fake_quant(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor, qn: int, qp: int, c: float
                   ) -> torch.Tensor:
    """LSQ+ fake quantization (s > 0 and beta broadcastable to x)."""
    s, beta = grad_scale(s, c), grad_scale(beta, c)
    return round_ste(((x - beta) / s).clamp(qn, qp)) * s + beta


def _codes(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return ((x - beta) / s).clamp(qn, qp).round()


def _init_grid(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qn: int, qp: int, sym: bool, steps: int,
               reduce_dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, beta) minimizing mean |x - Q(x)|^2.4 over clipping factors 1 - 0.01 i, i < steps; lo/hi
    (and the result) are shaped to broadcast against x, one choice per element of lo/hi. All factors
    are tried at once along a new leading axis."""
    a = (1.0 - 0.01 * torch.arange(steps, dtype=x.dtype)).reshape([-1] + [1] * x.dim())
    if sym:
        s = (a * torch.maximum(hi.abs(), lo.abs()) / qp).clamp_min(1e-8)
        beta = torch.zeros_like(s)
    else:
        s = (a * (hi - lo) / (qp - qn)).clamp_min(1e-8)
        beta = a * lo - qn * s
    err = (x - (_codes(x, s, beta, qn, qp) * s + beta)).abs().pow(_ERR_POWER).mean(
        dim=[d + 1 for d in reduce_dims], keepdim=True)
    best = err.argmin(dim=0, keepdim=True)
    return s.expand_as(err).gather(0, best)[0], beta.expand_as(err).gather(0, best)[0]


class WeightQuantizer(torch.nn.Module):
    """Elastic weight quantizer. Parameters: ``scale_t``/``offset_t`` (2 symmetries x 7 bits) and
    ``scale_c``/``offset_c`` (2 x 7 x channels); symmetry index 0 = sym, 1 = asym."""

    def __init__(self, w: torch.Tensor, axis: int, bits: tuple[int, ...]):
        super().__init__()
        self.axis = axis
        self.channels = w.shape[axis]
        self.numel = w.numel()
        self.cfg: tuple[int, bool, bool] | None = None   # (bits, sym, per_channel); None = float
        self.scale_t = torch.nn.Parameter(torch.ones(2, 7))
        self.offset_t = torch.nn.Parameter(torch.zeros(2, 7))
        self.scale_c = torch.nn.Parameter(torch.ones(2, 7, self.channels))
        self.offset_c = torch.nn.Parameter(torch.zeros(2, 7, self.channels))
        self._init(w.detach().float(), bits)

    def _shape(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * dim
        shape[self.axis] = -1
        return t.reshape(shape)

    def _init(self, w: torch.Tensor, bits: tuple[int, ...]) -> None:
        others = [d for d in range(w.dim()) if d != self.axis]
        lo_c, hi_c = self._shape(w.amin(dim=others), w.dim()), self._shape(w.amax(dim=others), w.dim())
        lo_t, hi_t = w.min().reshape([1] * w.dim()), w.max().reshape([1] * w.dim())
        with torch.no_grad():
            for b in bits:
                qn, qp = qrange(b, True)
                for k, sym in enumerate((True, False)):
                    s, beta = _init_grid(w, lo_t, hi_t, qn, qp, sym, 80, list(range(w.dim())))
                    self.scale_t[k, b - 2], self.offset_t[k, b - 2] = s.reshape(()), beta.reshape(())
                    s, beta = _init_grid(w, lo_c, hi_c, qn, qp, sym, 5 if sym else 80, others)
                    self.scale_c[k, b - 2], self.offset_c[k, b - 2] = s.reshape(-1), beta.reshape(-1)

    def qparams(self, bits: int, sym: bool, channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, beta) of one configuration: 0-d (per tensor) or (channels,) tensors; beta = 0 if sym."""
        k = 0 if sym else 1
        s, beta = (self.scale_c, self.offset_c) if channel else (self.scale_t, self.offset_t)
        s, beta = s[k, bits - 2].abs().clamp_min(1e-8), beta[k, bits - 2]
        return s, (torch.zeros_like(beta) if sym else beta)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.cfg is None:
            return w
        bits, sym, channel = self.cfg
        qn, qp = qrange(bits, True)
        s, beta = self.qparams(bits, sym, channel)
        n = self.numel // self.channels if channel else self.numel
        if channel:
            s, beta = self._shape(s, w.dim()), self._shape(beta, w.dim())
        return lsq_fake_quant(w, s, beta, qn, qp, 1.0 / math.sqrt(qp * n))

    def codes(self, w: torch.Tensor, bits: int, sym: bool, channel: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes (int8), scales and offsets of ``w``: w_bar = s codes + beta exactly as in forward."""
        qn, qp = qrange(bits, True)
        s, beta = (t.detach() for t in self.qparams(bits, sym, channel))
        sb, bb = (self._shape(s, w.dim()), self._shape(beta, w.dim())) if channel else (s, beta)
        return _codes(w.detach(), sb, bb, qn, qp).to(torch.int8), s, beta


class ActQuantizer(torch.nn.Module):
    """Elastic per-tensor activation quantizer: ``scale``/``offset`` (2 symmetries x 7 bits);
    ``signed`` is fixed by the calibration batch."""

    def __init__(self, x: torch.Tensor, bits: tuple[int, ...]):
        super().__init__()
        x = x.detach().float()
        self.signed = bool(x.min() < -1e-9)
        lo, hi = x.min().reshape(1), x.max().reshape(1)
        x = x.reshape(-1)[:: max(1, x.numel() // _INIT_ELEMENTS)]  # the error of the grid on a subsample
        self.cfg: tuple[int, bool] | None = None         # (bits, sym); None = float
        self.scale = torch.nn.Parameter(torch.ones(2, 7))
        self.offset = torch.nn.Parameter(torch.zeros(2, 7))
        with torch.no_grad():
            for b in bits:
                qn, qp = qrange(b, self.signed)
                for k, sym in enumerate((True, False)):
                    s, beta = _init_grid(x, lo, hi, qn, qp, sym, 80, [0])
                    self.scale[k, b - 2], self.offset[k, b - 2] = s.reshape(()), beta.reshape(())

    def qparams(self, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
        k = 0 if sym else 1
        s, beta = self.scale[k, bits - 2].abs().clamp_min(1e-8), self.offset[k, bits - 2]
        return s, (torch.zeros_like(beta) if sym else beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg is None:
            return x
        bits, sym = self.cfg
        qn, qp = qrange(bits, self.signed)
        s, beta = self.qparams(bits, sym)
        return lsq_fake_quant(x, s, beta, qn, qp, 1.0 / math.sqrt(qp * x.numel()))
