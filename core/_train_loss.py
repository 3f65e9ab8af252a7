"""Task losses of ``regc.train`` (``TrainSpec.loss``), each ``fn(model, batch) -> scalar``:

    ce       cross-entropy of the first output against integer labels
    mse      mean squared error of the first output against float labels (reshaped like it)
    distill  mean over outputs of MSE(student_i, teacher_i): recovery towards the original model
    kd       T^2 * KL(softmax(t/T) || softmax(s/T)) on the first output (Hinton distillation, batch mean)
    auto     ce with integer labels, mse with float labels, distill without labels
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from regc.errors import ConfigError

__all__ = ["LOSSES", "resolve_loss", "needs_teacher"]

LOSSES = ("auto", "ce", "mse", "distill", "kd")


def needs_teacher(kind: str, has_labels: bool) -> bool:
    return kind in ("distill", "kd") or (kind == "auto" and not has_labels)


def resolve_loss(kind: str, labels: torch.Tensor | None, temperature: float
                 ) -> Callable[[Any, Any], torch.Tensor]:
    """The loss function for ``kind`` given the first batch's labels (for 'auto' and checks)."""
    if kind == "auto":
        kind = "distill" if labels is None else ("mse" if labels.is_floating_point() else "ce")
    if kind in ("ce", "mse") and labels is None:
        raise ConfigError(f"train.loss='{kind}' needs labels, and the data has none "
                          "(add 'labels' to the data, or use loss=distill to match the original model)")
    if kind == "ce":
        return lambda model, b: F.cross_entropy(b.output, b.labels.long())
    if kind == "mse":
        return lambda model, b: F.mse_loss(b.output, b.labels.to(b.output.dtype).reshape(b.output.shape))
    if kind == "distill":
        return _distill
    t = temperature
    return lambda model, b: t * t * F.kl_div(F.log_softmax(b.output / t, -1),
                                             F.log_softmax(b.teacher_outputs[0] / t, -1),
                                             log_target=True, reduction="batchmean")


def _distill(model: Any, b: Any) -> torch.Tensor:
    pairs = [(s, t) for s, t in zip(b.outputs, b.teacher_outputs, strict=True) if s.is_floating_point()]
    return sum(F.mse_loss(s, t) for s, t in pairs) / len(pairs)
