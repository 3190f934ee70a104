"""Torch custom ops over the backends: schema, fake (meta) kernels and autograd.

``kdkernels::kd_rows`` returns per-row losses and backend-private statistics;
``kdkernels::kd_rows_backward`` turns per-row loss gradients into the student-logit gradient.
Both dispatch to the backend module named by their ``backend`` argument, so every backend gets
``torch.compile(fullgraph=True)`` support and autograd from this one place.
"""
from __future__ import annotations

import math
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


# ---- fused forward + gradient --------------------------------------------------------------------
# ``kd_rows_with_grad`` asks the backend for the per-row losses AND the gradient
# G = grad_scale · d loss_i / d student_i in one call (backend function ``forward_rows_with_grad``):
# the CPU kernels keep each row in cache between the passes, so the student and teacher are read
# once and each exponential is computed once. ``grad_scale`` is the per-row grad_loss the caller
# expects backward to bring (for a batch mean 1/denominator; 1 when unknown). Backward hands G on
# as the gradient when grad_loss is that one (no second kernel, no second [N, V] buffer), and a
# rescaled copy otherwise. functional.kd_loss uses it when the student needs a gradient.

@torch.compiler.assume_constant_result
def has_forward_with_grad(backend: str, device_type: str) -> bool:
    """True when ``backend`` implements ``forward_rows_with_grad`` for tensors on ``device_type``
    (a constant for torch.compile)."""
    if backend == "reference":
        return False
    mod = backends.load(backend)
    return (getattr(mod, "forward_rows_with_grad", None) is not None
            and device_type in getattr(mod, "FORWARD_WITH_GRAD_DEVICES", ()))


@torch.library.custom_op("kdkernels::kd_rows_with_grad", mutates_args=())
def kd_rows_with_grad(student: Tensor, teacher: Tensor, labels: Optional[Tensor], backend: str,
                      div_id: int, param: float, temperature: float, soft_weight: float,
                      hard_weight: float, ignore_index: int,
                      grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return backends.load(backend).forward_rows_with_grad(student, teacher, labels, div_id, param,
                                                         temperature, soft_weight, hard_weight,
                                                         ignore_index, grad_scale)


@kd_rows_with_grad.register_fake
def _(student, teacher, labels, backend, div_id, param, temperature, soft_weight, hard_weight,
      ignore_index, grad_scale=None):
    n = student.shape[0] * student.shape[1]
    return (student.new_empty((n,), dtype=_loss_dtype(student)),
            torch.empty(student.shape, dtype=student.dtype, device=student.device))


# Calls of scale_rows that had to multiply (tests check that the expected cases skip it).
SCALE_ROWS_MULTIPLIES = [0]


def _eager(t: Tensor) -> bool:
    # a plain tensor outside tracing (not fake, functional or proxied)
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def scale_rows(grad: Tensor, grad_loss: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    """grad[b, l, :] * grad_loss[r] / grad_scale[r] (r = b * L + l; grad_scale None: ones), in
    fp32 rounded once to the dtype of ``grad``. On CPU, outside tracing, ``grad`` itself is
    returned when grad_loss equals grad_scale on every row (the gradient was computed for exactly
    that grad_loss); otherwise a new tensor."""
    shape = (grad.shape[0], grad.shape[1], 1)
    gl = grad_loss.reshape(shape).to(torch.float32)
    gs = None if grad_scale is None else grad_scale.reshape(shape)
    if grad.device.type == "cpu" and _eager(grad) \
            and bool((gl == (1.0 if gs is None else gs)).all()):
        return grad
    SCALE_ROWS_MULTIPLIES[0] += 1
    # grad_scale is 0 only on masked rows, whose gradient is 0
    ratio = gl if gs is None else torch.where(gs != 0, gl / gs, 0.0)
    out = torch.empty_like(grad)
    return torch.mul(grad, ratio, out=out)  # computed in fp32, rounded once into out


def _setup_with_grad(ctx, inputs, output):
    student, teacher, labels, *scalars = inputs
    ctx.scalars, ctx.grad_scale_given = scalars[:-1], scalars[-1] is not None
    ctx.save_for_backward(student, teacher, labels, scalars[-1], output[1])
    # G is no differentiable output; without this autograd would fill a zero [N, V] grad for it.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_with_grad(ctx, grad_loss, grad_grad):
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        _, _, _, grad_scale, g = ctx.saved_tensors
        # G itself when grad_loss is the one it was computed for: no copy, no second buffer
        grad = scale_rows(g, grad_loss, grad_scale)
    return (grad,) + (None,) * 10


torch.library.register_autograd("kdkernels::kd_rows_with_grad", _backward_with_grad,
                                setup_context=_setup_with_grad)
