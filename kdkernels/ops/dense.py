"""The dense row ops: schema, fake (meta) kernels and autograd (``torch.library`` only).

``kdkernels::kd_rows`` returns per-row losses and statistics; ``kdkernels::kd_rows_backward``
(or ``..._backward_inplace``) turns per-row loss gradients into the student-logit gradient;
``kdkernels::kd_rows_with_grad`` forms losses and gradient in one call;
``kdkernels::kd_rows_given_stats`` sums φ and q·g over a row's columns with given normalisers (the
vocab-parallel pass with the global statistics; no autograd: its caller differentiates through
``kd_rows_backward``).
They dispatch to the backend module named by their ``backend`` argument, so every backend gets
``torch.compile(fullgraph=True)`` support and autograd from this one place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends


@torch.library.custom_op("kdkernels::kd_rows", mutates_args=())
def kd_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], backend: str, div_id: int,
            param: float, temperature: float, soft_weight: float, hard_weight: float,
            ignore_index: int, grad_inplace: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-row losses and statistics. ``grad_inplace``: backward writes the gradient into the
    student logits' own storage (opt-in; the logits are destroyed)."""
    return backends.load(backend).forward_rows(student, teacher, labels, div_id, param, temperature,
                                               soft_weight, hard_weight, ignore_index)


@kd_rows.register_fake
def _(student, teacher, labels, backend, div_id, param, temperature, soft_weight, hard_weight,
      ignore_index, grad_inplace=False):
    return backends.rows_outputs_like(student)


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
    ctx.scalars, ctx.grad_inplace = scalars[:-1], scalars[-1]


def _backward(ctx, grad_loss, grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        if ctx.grad_inplace:
            grad = student.detach()  # same storage; overwritten with the gradient just below
            kd_rows_backward_inplace(grad_loss, grad, teacher, labels, stats, *ctx.scalars)
        else:
            grad = kd_rows_backward(grad_loss, student, teacher, labels, stats, *ctx.scalars)
    return (grad,) + (None,) * 10


torch.library.register_autograd("kdkernels::kd_rows", _backward, setup_context=_setup_context)


# ``kd_rows_backward_inplace`` writes the gradient into the student logits' own storage (it
# mutates ``student``) and ``_backward`` hands that storage on as the gradient, so backward
# allocates no [N, V] buffer on backends with the "grad_inplace" capability.

@torch.library.custom_op("kdkernels::kd_rows_backward_inplace", mutates_args=("student",))
def kd_rows_backward_inplace(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                             labels: Optional[Tensor], stats: Tensor, backend: str, div_id: int,
                             param: float, temperature: float, soft_weight: float,
                             hard_weight: float, ignore_index: int) -> None:
    mod = backends.load(backend)
    args = (grad_loss.contiguous(), student, teacher, labels, stats, div_id, param, temperature,
            soft_weight, hard_weight, ignore_index)
    if backends.has(backend, "grad_inplace"):
        mod.backward_rows(*args, out=student)
    else:  # a backend without an in-place kernel: same result, without the memory saving
        student.copy_(mod.backward_rows(*args))


@kd_rows_backward_inplace.register_fake
def _(grad_loss, student, teacher, labels, stats, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index):
    return None


# ---- fused forward + gradient --------------------------------------------------------------------
# ``kd_rows_with_grad`` asks the backend for the per-row losses AND the gradient
# G = grad_scale · d loss_i / d student_i in one call (backend function ``forward_rows_with_grad``):
# the CPU kernels keep each row in cache between the passes, so the student and teacher are read
# once and each exponential is computed once. ``grad_scale`` is the per-row grad_loss the caller
# expects backward to bring (for a batch mean 1/denominator; 1 when unknown). Backward hands G on
# as the gradient when grad_loss is that one (no second kernel, no second [N, V] buffer), and a
# rescaled copy otherwise. ``kd_loss`` uses it on backends with the "fused_grad" capability when
# the student needs a gradient.


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
    return (backends.rows_outputs_like(student)[0],
            torch.empty(student.shape, dtype=student.dtype, device=student.device))


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
    ctx.g_handed = False  # True once G has been rescaled in place and handed on (see below)


def _backward_with_grad(ctx, grad_loss, grad_grad):
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        student, teacher, labels, grad_scale, g = ctx.saved_tensors
        if ctx.g_handed:
            # a later backward of a retained graph: G was rescaled in place and handed on by the
            # first one; the gradient is computed afresh for this grad_loss (exact, rare)
            backend, *scalars = ctx.scalars
            _, grad = backends.load(backend).forward_rows_with_grad(
                student, teacher, labels, *scalars,
                grad_loss.detach().reshape(-1).to(torch.float32).contiguous())
        else:
            backend = ctx.scalars[0]
            if _eager(g) and backends.has(backend, "grad_rescale"):
                # (triton, cuda) rescale G in place, on the device, skipping rows whose ratio is
                # exactly 1 (no bytes moved, no host synchronisation), and hand G itself on. G is
                # this op's own buffer (kd_loss drops the output); a later backward of a retained
                # graph recomputes (above)
                grad = backends.load(backend).rescale_rows_(g, grad_loss, grad_scale)
                ctx.g_handed = True
            else:
                # G itself when grad_loss is the one it was computed for: no copy, no second buffer
                grad = scale_rows(g, grad_loss, grad_scale)
    return (grad,) + (None,) * 10


torch.library.register_autograd("kdkernels::kd_rows_with_grad", _backward_with_grad,
                                setup_context=_setup_with_grad)


# ---- the given-statistics pass (vocab-parallel) ---------------------------------------------------

@torch.library.custom_op("kdkernels::kd_rows_given_stats", mutates_args=())
def kd_rows_given_stats(student: Tensor, teacher: Tensor, labels: Optional[Tensor], stats: Tensor,
                        backend: str, div_id: int, param: float, temperature: float,
                        ignore_index: int) -> Tensor:
    """[N, 2] fp32: per row (Σφ, Σ q·g) over the columns of ``student`` with the normalisers
    given in ``stats`` (backend function ``forward_rows_given_stats``). Not differentiable."""
    return backends.load(backend).forward_rows_given_stats(student, teacher, labels,
                                                           stats.contiguous(), div_id, param,
                                                           temperature, ignore_index)


@kd_rows_given_stats.register_fake
def _(student, teacher, labels, stats, backend, div_id, param, temperature, ignore_index):
    return student.new_empty((student.shape[0] * student.shape[1], 2), dtype=torch.float32)
