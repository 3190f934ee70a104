"""Hidden-state feature losses (FitNets / DistilBERT-style distillation).

Per row (token) of student hidden states h_s [..., Ds] and teacher hidden states h_t [..., Dt],
with x = projection(h_s) (identity when no projection is given, then Ds must equal Dt):

    kind="mse":    mean over the Dt features of (x − h_t)²
    kind="cosine": 1 − cos(x, h_t)

computed in fp32 (float64 for float64 inputs). Rows whose label equals ``ignore_index`` count for
nothing: their loss is 0 and no gradient reaches the student, the teacher or the projection from
them, even if they hold NaN (padding). ``token_weights`` multiply the rows as in ``kd_loss``.

Reductions as in ``kd_loss``: "sum", "batchmean" (sum / counted rows, or / the sum of the counted
token weights, or / ``num_items_in_batch``) and "none" (per-row values, leading shape). Because each
row's value is already a mean over features (mse) or a per-row similarity (cosine), "mean" is the
same as "batchmean" here; for mse it equals ``torch.nn.functional.mse_loss(reduction="mean")`` over
the counted rows.

Plain differentiable PyTorch (hidden states are [N, D] with D in the thousands: no kernel
needed). Gradients reach every input that requires grad, the teacher's hidden states included.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..checks import (check_float_tensor, check_int, check_labels, check_num_items,
                      check_reduction, check_same_rows, check_token_weights, compute_dtype,
                      mask_zero_weights)
from ..reduction import reduce_rows

__all__ = ["feature_loss", "FeatureLoss", "KINDS"]

KINDS = ("mse", "cosine")
_COS_EPS = 1e-8  # denominators ‖x‖·‖h_t‖ below this count as this (zero vectors give cos 0)


def feature_loss(student_h: Tensor, teacher_h: Tensor, kind: str = "mse",
                 projection: Optional[Callable[[Tensor], Tensor]] = None,
                 labels: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "batchmean", num_items_in_batch=None,
                 token_weights: Optional[Tensor] = None) -> Tensor:
    """Feature-matching loss between student and teacher hidden states (see the module doc).

    Args:
        student_h: [..., Ds] float tensor.
        teacher_h: [..., Dt] float tensor with the same leading shape.
        kind: "mse" or "cosine".
        projection: optional callable [..., Ds] -> [..., Dt], typically an ``nn.Linear``
            (``FeatureLoss`` owns one). Without it Ds must equal Dt.
        labels: optional [...] integer tensor; rows equal to ``ignore_index`` are excluded.
        reduction: "batchmean", "sum", "mean" (= "batchmean" for features) or "none".
        num_items_in_batch: global count of counted rows for the "batchmean" denominator.
        token_weights: optional non-negative float tensor of the leading shape.

    Returns:
        float32 (float64 for float64 inputs): a scalar, or the leading shape for "none".
    """
    check_float_tensor("student_h", student_h, last="D")
    check_float_tensor("teacher_h", teacher_h, last="D")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_reduction(reduction)
    if projection is not None and not callable(projection):
        raise TypeError(f"projection must be callable (e.g. an nn.Linear) or None, got "
                        f"{type(projection).__name__}")
    lead = student_h.shape[:-1]
    check_same_rows("teacher_h", teacher_h, "student_h", student_h)
    if projection is None and student_h.shape[-1] != teacher_h.shape[-1]:
        raise ValueError(f"student_h width {student_h.shape[-1]} differs from teacher_h width "
                         f"{teacher_h.shape[-1]}; pass a projection (e.g. FeatureLoss(..., "
                         f"student_dim=..., teacher_dim=...))")
    ii = check_int("ignore_index", ignore_index)
    check_num_items(num_items_in_batch, reduction)
    flat_labels = check_labels(labels, lead, student_h.device, None, ii, what="hidden states")
    flat_w = check_token_weights(token_weights, lead, student_h.device)
    flat_labels = mask_zero_weights(flat_labels, flat_w, ii)

    s = student_h.reshape(-1, student_h.shape[-1])
    t = teacher_h.reshape(-1, teacher_h.shape[-1])
    if flat_labels is not None:
        # Excluded rows may hold garbage (NaN padding): zero them before anything touches them,
        # so that neither the loss nor any gradient (projection weights included) sees them.
        keep = (flat_labels != ii).unsqueeze(-1)
        s = torch.where(keep, s, 0.0)
        t = torch.where(keep, t, 0.0)
    x = projection(s) if projection is not None else s
    if x.shape[-1] != t.shape[-1]:
        raise ValueError(f"projection maps to width {x.shape[-1]} but teacher_h has width "
                         f"{t.shape[-1]}")
    cd = compute_dtype(torch.promote_types(x.dtype, t.dtype))
    x, t = x.to(cd), t.to(cd)
    if kind == "mse":
        rows = (x - t).square().mean(-1)
    else:
        denom = (x.norm(dim=-1) * t.norm(dim=-1)).clamp_min(_COS_EPS)
        rows = 1.0 - (x * t).sum(-1) / denom
    if flat_labels is not None:
        rows = torch.where(flat_labels != ii, rows, 0.0)
    return reduce_rows(rows, reduction, lead, 1, flat_labels, ii, num_items_in_batch,
                       token_weights=flat_w)


class FeatureLoss(torch.nn.Module):
    """``feature_loss`` as a module that owns the optional learned projection
    ``nn.Linear(student_dim, teacher_dim)`` (created when both widths are given and differ, or
    when ``projection=True``). Put its parameters in the student's optimizer.

    >>> crit = FeatureLoss("cosine", student_dim=768, teacher_dim=1024)
    >>> loss = crit(student_hidden, teacher_hidden, labels)       # doctest: +SKIP
    """

    def __init__(self, kind: str = "mse", student_dim: Optional[int] = None,
                 teacher_dim: Optional[int] = None, projection: Optional[bool] = None,
                 bias: bool = True, ignore_index: int = -100, reduction: str = "batchmean",
                 device=None, dtype=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_reduction(reduction)
        for name, d in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
                raise ValueError(f"{name} must be a positive int or None, got {d!r}")
        if projection is None:
            projection = student_dim is not None and teacher_dim is not None \
                and student_dim != teacher_dim
        if projection and (student_dim is None or teacher_dim is None):
            raise ValueError("a projection needs both student_dim and teacher_dim")
        self.kind = kind
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.projection = (torch.nn.Linear(student_dim, teacher_dim, bias=bias, device=device,
                                           dtype=dtype) if projection else None)

    def forward(self, student_h: Tensor, teacher_h: Tensor, labels: Optional[Tensor] = None,
                num_items_in_batch=None, token_weights: Optional[Tensor] = None) -> Tensor:
        return feature_loss(student_h, teacher_h, kind=self.kind, projection=self.projection,
                            labels=labels, ignore_index=self.ignore_index,
                            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
                            token_weights=token_weights)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"
