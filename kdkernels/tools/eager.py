"""The naive eager formula: what a user writes without this library (the benchmark baseline).

It holds several [N, V] fp32 buffers; the library never uses it."""
from __future__ import annotations

import torch

from .. import divergences as D
from ..backends.reference import row_losses

__all__ = ["eager_kd_loss"]


def eager_kd_loss(student: torch.Tensor, teacher: torch.Tensor, divergence: str = "forward_kl",
                  temperature: float = 1.0, labels=None, ignore_index: int = -100,
                  soft_weight: float = 1.0, hard_weight: float = 0.0, beta=None, alpha=None,
                  reduction: str = "batchmean", teacher_weights=None,
                  teacher_grad: bool = False) -> torch.Tensor:
    """What a user writes without this library: the DESIGN.md §2 formula on the full [N, V]
    tensors, plain autograd. Used as the baseline in benchmarks, not by the library itself.
    ``teacher`` may be a list of M tensors with ``teacher_weights`` (an ensemble); with
    ``teacher_grad`` the teachers are not detached (online distillation)."""
    div = D.get(divergence)
    param = D.resolve_param(div, beta, alpha)
    V = student.shape[-1]
    s2 = student.reshape(-1, V)

    def rows_of(t):
        t = t if teacher_grad else t.detach()
        return t[..., :V].reshape(-1, V)

    t2 = rows_of(teacher) if teacher_weights is None else [rows_of(t) for t in teacher]
    lab = None if labels is None else labels.reshape(-1)
    rows = row_losses(s2, t2, lab, div.id, param, temperature, soft_weight, hard_weight, ignore_index,
                      teacher_weights=teacher_weights)
    n = rows.numel() if lab is None else (lab != ignore_index).sum().clamp_min(1)
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows.view(student.shape[:-1])
    out = rows.sum() / n
    return out / V if reduction == "mean" else out
