"""The dense row ops of teacher ensembles: schema, fake (meta) kernels and autograd (``torch.library``
only), as ``kdkernels.ops.dense`` for one teacher.

The target is p = Σ_m w_m softmax(t_m / T). ``kdkernels::kd_rows_ensemble`` returns per-row
losses and statistics (backend function ``forward_rows_ensemble``), ``kdkernels::
kd_rows_ensemble_backward`` turns per-row loss gradients into the student-logit gradient
(``backward_rows_ensemble``), and ``kdkernels::kd_rows_ensemble_with_grad`` forms losses and
gradient in one call (``forward_rows_ensemble_with_grad``, backends with "fused_grad"). Teachers
are a ``List[Tensor]`` of [B, L, Vt >= V] views and the weights a ``List[float]``; the teachers are
constants (no gradient: teacher gradients with ensembles run on the reference backend).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .dense import scale_rows

__all__ = ["kd_rows_ensemble", "kd_rows_ensemble_backward", "kd_rows_ensemble_with_grad",
           "drop_zero_weight_teachers"]


def drop_zero_weight_teachers(teachers: list, weights):
    """(teachers, weights) without the teachers of weight 0; weights None when one is left (the
    single-teacher path). ``weights`` None (a single teacher) is returned as it is."""
    if weights is None:
        return teachers, None
    kept = [(t, w) for t, w in zip(teachers, weights) if w != 0.0]
    if len(kept) == 1:
        return [kept[0][0]], None
    return [t for t, _ in kept], [w for _, w in kept]


@torch.library.custom_op("kdkernels::kd_rows_ensemble", mutates_args=())
def kd_rows_ensemble(student: Tensor, teachers: List[Tensor], weights: List[float],
                     labels: Optional[Tensor], backend: str, div_id: int, param: float,
                     temperature: float, soft_weight: float, hard_weight: float,
                     ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-row losses [N] and statistics [N, ensemble_stats_width(M)] against the ensemble."""
    return backends.load(backend).forward_rows_ensemble(student, teachers, weights, labels, div_id,
                                                        param, temperature, soft_weight,
                                                        hard_weight, ignore_index)


@kd_rows_ensemble.register_fake
def _(student, teachers, weights, labels, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index):
    return backends.rows_outputs_like(student, backends.ensemble_stats_width(len(teachers)))


@torch.library.custom_op("kdkernels::kd_rows_ensemble_backward", mutates_args=())
def kd_rows_ensemble_backward(grad_loss: Tensor, student: Tensor, teachers: List[Tensor],
                              weights: List[float], labels: Optional[Tensor], stats: Tensor,
                              backend: str, div_id: int, param: float, temperature: float,
                              soft_weight: float, hard_weight: float,
                              ignore_index: int) -> Tensor:
    return backends.load(backend).backward_rows_ensemble(
        grad_loss.contiguous(), student, teachers, weights, labels, stats.contiguous(), div_id,
        param, temperature, soft_weight, hard_weight, ignore_index)


@kd_rows_ensemble_backward.register_fake
def _(grad_loss, student, teachers, weights, labels, stats, backend, div_id, param, temperature,
      soft_weight, hard_weight, ignore_index):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _grads(ctx, grad):
    """One entry per input as the op was called (a trailing default may be left out): the
    student's gradient, then a list of None for the teachers (constants), None for the rest."""
    return (grad, [None] * ctx.n_teachers) + (None,) * (len(ctx.needs_input_grad) - 2)


def _setup_context(ctx, inputs, output):
    student, teachers, weights, labels, *scalars = inputs
    ctx.n_teachers, ctx.weights, ctx.scalars = len(teachers), weights, scalars
    ctx.save_for_backward(student, labels, output[1], *teachers)


def _backward(ctx, grad_loss, grad_stats):
    student, labels, stats, *teachers = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = kd_rows_ensemble_backward(grad_loss, student, teachers, ctx.weights, labels, stats,
                                         *ctx.scalars)
    return _grads(ctx, grad)


torch.library.register_autograd("kdkernels::kd_rows_ensemble", _backward,
                                setup_context=_setup_context)


# ---- fused forward + gradient (as kdkernels.ops.dense.kd_rows_with_grad) ---------------------------

@torch.library.custom_op("kdkernels::kd_rows_ensemble_with_grad", mutates_args=())
def kd_rows_ensemble_with_grad(student: Tensor, teachers: List[Tensor], weights: List[float],
                               labels: Optional[Tensor], backend: str, div_id: int, param: float,
                               temperature: float, soft_weight: float, hard_weight: float,
                               ignore_index: int,
                               grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(loss [N], G) with G = grad_scale · d loss_i / d student_i (ones when None) in one call."""
    return backends.load(backend).forward_rows_ensemble_with_grad(
        student, teachers, weights, labels, div_id, param, temperature, soft_weight, hard_weight,
        ignore_index, grad_scale)


@kd_rows_ensemble_with_grad.register_fake
def _(student, teachers, weights, labels, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index, grad_scale=None):
    return (backends.rows_outputs_like(student)[0],
            torch.empty(student.shape, dtype=student.dtype, device=student.device))


def _setup_with_grad(ctx, inputs, output):
    student, teachers, weights, labels, *scalars = inputs
    ctx.n_teachers = len(teachers)
    ctx.save_for_backward(scalars[-1], output[1])
    # G is no differentiable output; without this autograd would fill a zero [N, V] grad for it.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_with_grad(ctx, grad_loss, grad_grad):
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad_scale, g = ctx.saved_tensors
        grad = scale_rows(g, grad_loss, grad_scale)  # G itself when grad_loss is its grad_scale
    return _grads(ctx, grad)


torch.library.register_autograd("kdkernels::kd_rows_ensemble_with_grad", _backward_with_grad,
                                setup_context=_setup_with_grad)
