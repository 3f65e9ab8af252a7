"""EQ-Net's training losses (TECHNIQUES.md 5.3).

Sandwich rule (BigNAS): each step runs the highest-bit subnet H, ``n`` random subnets R_1..R_n and the
lowest-bit subnet L on the same batch; the chain of logits is Y_0 = Y_H, Y_1.., Y_last = Y_L.

    plain sandwich   L = sum_k CE(Y_k, y)
    GPG              L = CE(Y_0, y) + sum_{k>=1} [ lambda KL(Y_{k-1} || Y_k) + (1 - lambda) CE(Y_k, y) ]

with KL(teacher || student) = sum p_t (log p_t - log p_s) over softmax(./T), batch mean, the teacher
Y_{k-1} detached (each subnet learns from the next-higher one: progressive guidance). Gradients of
all subnets add up before the one optimizer step.

WDR (weight distribution regularization) is ``regc.passes._reg_math.wdr`` on the float shared weights:
mean_l ( Skew[w_l]^2 + kurt_weight (Kurt[w_l] - K_T)^2 ), K_T = 1.8, kurt_weight = 0.015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kl_teacher_student", "sandwich_loss"]


def kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
                       ) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), batch mean; no gradient into the teacher."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher.detach() / temperature, -1),
                    reduction="batchmean")


def sandwich_loss(chain: list[torch.Tensor], labels: torch.Tensor, gpg: bool, lam: float = 0.5,
                  temperature: float = 1.0) -> torch.Tensor:
    """The sandwich loss over logits ordered from the highest-bit to the lowest-bit subnet."""
    total = F.cross_entropy(chain[0], labels)
    for teacher, student in zip(chain[:-1], chain[1:], strict=True):
        ce = F.cross_entropy(student, labels)
        if gpg:
            ce = lam * kl_teacher_student(student, teacher, temperature) + (1 - lam) * ce
        total = total + ce
    return total
