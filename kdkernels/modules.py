"""nn.Module wrappers over the functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import divergences as D
from .functional import REDUCTIONS, kd_loss

__all__ = ["KDLoss"]


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: the options are fixed at construction and checked there.

    >>> crit = KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
    >>> loss = crit(student_logits, teacher_logits, labels)      # doctest: +SKIP
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 ignore_index: int = -100, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 reduction: str = "batchmean", beta: Optional[float] = None,
                 alpha: Optional[float] = None, backend: str = "auto", teacher_weights=None,
                 teacher_requires_grad: Optional[bool] = None, grad_inplace: bool = False,
                 process_group=None, vocab_start_index: Optional[int] = None):
        super().__init__()
        D.resolve_param(D.get(divergence), beta, alpha)  # fail early, at construction
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
                or not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.divergence = divergence
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight
        self.reduction = reduction
        self.beta = beta
        self.alpha = alpha
        self.backend = backend
        self.teacher_weights = teacher_weights            # ensemble weights (checked per call)
        self.teacher_requires_grad = teacher_requires_grad
        if not isinstance(grad_inplace, bool):
            raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__}")
        self.grad_inplace = grad_inplace  # see kd_loss: backward overwrites the student logits
        # vocab-parallel (tensor-parallel) loss over this torch.distributed group, if given
        self.process_group = process_group
        self.vocab_start_index = vocab_start_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None, num_items_in_batch=None,
                token_weights: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, divergence=self.divergence,
                       temperature=self.temperature, labels=labels,
                       ignore_index=self.ignore_index, soft_weight=self.soft_weight,
                       hard_weight=self.hard_weight, reduction=self.reduction,
                       num_items_in_batch=num_items_in_batch, beta=self.beta, alpha=self.alpha,
                       backend=self.backend, token_weights=token_weights,
                       teacher_weights=self.teacher_weights,
                       teacher_requires_grad=self.teacher_requires_grad,
                       grad_inplace=self.grad_inplace, process_group=self.process_group,
                       vocab_start_index=self.vocab_start_index)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("beta", "alpha")
                        if getattr(self, k) is not None)
        return (f"divergence={self.divergence!r}, temperature={self.temperature}{extra}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
