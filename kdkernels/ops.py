"""Torch custom ops over the backends: schema, fake (meta) kernels and autograd.

``kdkernels::kd_rows`` returns per-row losses and backend-private statistics;
``kdkernels::kd_rows_backward`` turns per-row loss gradients into the student-logit gradient.
Both dispatch to the backend module named by their ``backend`` argument, so every backend gets
``torch.compile(fullgraph=True)`` support and autograd from this one place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends


def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kdkernels::kd_rows", mutates_args=())
def kd_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], backend: str, div_id: int,
            param: float, temperature: float, soft_weight: float, hard_weight: float,
            ignore_index: int) -> Tuple[Tensor, Tensor]:
    return backends.load(backend).forward_rows(student, teacher, labels, div_id, param, temperature,
                                               soft_weight, hard_weight, ignore_index)


@kd_rows.register_fake
def _kd_rows_fake(student, teacher, labels, backend, div_id, param, temperature, soft_weight,
                  hard_weight, ignore_index):
    n = student.shape[0] * student.shape[1]
    return (student.new_empty((n,), dtype=_loss_dtype(student)),
            student.new_empty((n, backends.BACKENDS[backend].stats_width), dtype=torch.float32))


@torch.library.custom_op("kdkernels::kd_rows_backward", mutates_args=())
def kd_rows_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                     stats: Tensor, backend: str, div_id: int, param: float, temperature: float,
                     soft_weight: float, hard_weight: float, ignore_index: int) -> Tensor:
    return backends.load(backend).backward_rows(grad_loss.contiguous(), student, teacher, labels,
                                                stats, div_id, param, temperature, soft_weight,
                                                hard_weight, ignore_index)


@kd_rows_backward.register_fake
def _(grad_loss, student, teacher, labels, stats, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, *scalars = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.scalars = scalars


def _backward(ctx, grad_loss, grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = kd_rows_backward(grad_loss, student, teacher, labels, stats, *ctx.scalars)
    return (grad,) + (None,) * 9


torch.library.register_autograd("kdkernels::kd_rows", _backward, setup_context=_setup_context)


# ---- opt-in in-place gradient -----------------------------------------------------------------
# ``kd_rows_grad_inplace`` computes what ``kd_rows`` computes; its backward writes the gradient
# into the student logits' own storage (``kd_rows_backward_inplace`` mutates ``student``) and hands
# that storage on as the gradient, so backward allocates no [N, V] buffer. The student logits are
# destroyed: after backward they hold their gradient.

@torch.library.custom_op("kdkernels::kd_rows_grad_inplace", mutates_args=())
def kd_rows_grad_inplace(student: Tensor, teacher: Tensor, labels: Optional[Tensor], backend: str,
                         div_id: int, param: float, temperature: float, soft_weight: float,
                         hard_weight: float, ignore_index: int) -> Tuple[Tensor, Tensor]:
    return backends.load(backend).forward_rows(student, teacher, labels, div_id, param, temperature,
                                               soft_weight, hard_weight, ignore_index)


kd_rows_grad_inplace.register_fake(_kd_rows_fake)


@torch.library.custom_op("kdkernels::kd_rows_backward_inplace", mutates_args=("student",))
def kd_rows_backward_inplace(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                             labels: Optional[Tensor], stats: Tensor, backend: str, div_id: int,
                             param: float, temperature: float, soft_weight: float,
                             hard_weight: float, ignore_index: int) -> None:
    mod = backends.load(backend)
    args = (grad_loss.contiguous(), student, teacher, labels, stats, div_id, param, temperature,
            soft_weight, hard_weight, ignore_index)
    if getattr(mod, "SUPPORTS_GRAD_INPLACE", False):
        mod.backward_rows(*args, out=student)
    else:  # a backend without an in-place kernel: same result, without the memory saving
        student.copy_(mod.backward_rows(*args))


@kd_rows_backward_inplace.register_fake
def _(grad_loss, student, teacher, labels, stats, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index):
    return None


def _backward_inplace(ctx, grad_loss, grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = student.detach()  # same storage; overwritten with the gradient just below
        kd_rows_backward_inplace(grad_loss, grad, teacher, labels, stats, *ctx.scalars)
    return (grad,) + (None,) * 9


torch.library.register_autograd("kdkernels::kd_rows_grad_inplace", _backward_inplace,
                                setup_context=_setup_context)
