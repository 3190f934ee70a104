"""Public functional API: argument checks, flattening, masking, reduction and backend choice.

The kernels compute one fp32 loss per row; everything above that (which rows count, how the
rows are reduced, the denominator) lives here, in plain differentiable PyTorch.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends
from . import distributed
from . import divergences as D
from . import reference
from .ops import kd_rows, kd_rows_grad_inplace

__all__ = ["kd_loss", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_number(name: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")


def _unit_column_stride(x: Tensor, name: str) -> Tensor:
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        warnings.warn(f"{name} has a non-unit stride on the vocabulary dimension; copying it",
                      stacklevel=4)
        return x.contiguous()
    return x


def as_rows(*tensors: Tensor, names=None):
    """View tensors [..., V_i] (same leading shape) as [B, L, V_i] with unit column stride and
    the same (B, L) split, without a copy when their leading dims collapse into at most two
    strided dims (true of contiguous tensors, vocabulary slices ``t[..., :V]`` and sequence slices
    ``x[:, :-1]``). Anything else is copied, with a warning. Returns one view per tensor (a single
    tensor when given one)."""
    names = names or [f"tensor {i}" for i in range(len(tensors))]
    xs = [_unit_column_stride(x, n) for x, n in zip(tensors, names)]
    lead = xs[0].shape[:-1]
    sizes = [math.prod(lead[:k]) for k in range(len(lead) + 1)]
    n = sizes[-1]
    out = None
    for k in range(len(lead) + 1):  # split point k: [prod(lead[:k]), prod(lead[k:]), V]
        B = sizes[k]
        L = n // B if B else 0
        try:
            out = [x.view(B, L, x.shape[-1]) for x in xs]
            break
        except RuntimeError:
            continue
    if out is None:
        out = []
        for x, name in zip(xs, names):
            try:
                out.append(x.view(1, n, x.shape[-1]))
            except RuntimeError:
                warnings.warn(f"{name} has leading dimensions that do not collapse into two strided "
                              "dims; copying it", stacklevel=3)
                out.append(x.reshape(1, n, x.shape[-1]))
    return out[0] if len(out) == 1 else out


def _check_labels(labels, lead_shape, device, V: Optional[int],
                  ignore_index: int) -> Optional[Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have the leading shape of the logits {tuple(lead_shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    flat = labels.reshape(-1).to(torch.int64)
    # Range check only where it costs no device synchronisation and no graph break
    # (V is None: checked elsewhere, against the global vocabulary of a sharded loss).
    if V is not None and flat.device.type == "cpu" and not torch.compiler.is_compiling() \
            and flat.numel():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                             f"found {int(flat[i])} at flat position {i}")
    return flat


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "forward_kl",
            temperature: float = 1.0, labels: Optional[Tensor] = None, ignore_index: int = -100,
            soft_weight: float = 1.0, hard_weight: float = 0.0, reduction: str = "batchmean",
            num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
            beta: Optional[float] = None, alpha: Optional[float] = None,
            backend: str = "auto", grad_inplace: bool = False, process_group=None,
            vocab_start_index: Optional[int] = None) -> Tensor:
    """Knowledge-distillation loss between teacher and student next-token distributions.

    Per row (token): ``soft_weight · T² · D(p, q) + hard_weight · CE(softmax(s), label)`` with
    p = softmax(teacher/T), q = softmax(student/T) and D the ``divergence`` (see
    ``kdkernels.divergences``). Rows whose label equals ``ignore_index`` count for nothing.

    Args:
        student_logits: [..., V] float tensor (fp32, bf16, fp16, or float64 for the reference).
            Row-strided views such as ``logits[:, :-1]`` are used without a copy.
        teacher_logits: [..., Vt] with Vt >= V and the same leading shape and dtype; columns past
            V (a padded vocabulary) are dropped without a copy. Treated as a constant.
        divergence: "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl" or "tvd".
        temperature: T > 0, divides both teacher and student logits.
        labels: optional [...] integer tensor; enables masking and the hard-label term.
        ignore_index: label value of rows that do not count.
        soft_weight, hard_weight: weights of T²·D and of the hard cross-entropy (at T = 1).
        reduction: "batchmean" (sum / counted rows, or / num_items_in_batch), "sum",
            "mean" (batchmean / V) or "none" (per-row values, leading shape).
        num_items_in_batch: global count of counted tokens used as the batchmean denominator
            (gradient accumulation, data parallelism).
        beta: JSD mixture weight of the teacher, in (0, 1) (default 0.5).
        alpha: skew for "skew_kl" / "skew_reverse_kl", in [0, 1) (default 0.1).
        backend: "auto", "reference", "triton", "cuda" or "cpu".
        grad_inplace: opt-in memory saving for callers that no longer need the student logits:
            backward writes the gradient into the student logits' own storage, so no [N, V]
            gradient buffer is allocated. The logits are DESTROYED (they hold their gradient
            after backward), and autograd raises if anything else saved them for its backward.
            Ignored by the reference backend (it always allocates its gradient).
        process_group: a ``torch.distributed`` tensor-parallel group over which the logits are
            sharded on the vocabulary: each rank passes its [..., V_local] shards (same rows on
            every rank) and gets the loss of the full vocabulary (``kdkernels.distributed``).
            ``labels`` are then global vocabulary ids, and the vocabulary checks are per shard.
        vocab_start_index: with ``process_group``, the global id of this rank's first column;
            default: shards in rank order (offsets from the gathered shard sizes).

    Returns:
        A float32 tensor (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``. Zero counted rows give 0, never NaN.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits dtype {teacher_logits.dtype} differs from student_logits "
                        f"dtype {student_logits.dtype}; cast one of them")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits are on {teacher_logits.device} but student_logits are on "
                         f"{student_logits.device}")
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} differs "
                         f"from student_logits leading shape {tuple(lead)}")
    if teacher_logits.shape[-1] < V:
        raise ValueError(f"teacher_logits vocabulary ({teacher_logits.shape[-1]}) is smaller than "
                         f"student_logits vocabulary ({V}); the teacher may only be wider (padded)")
    div = D.get(divergence)
    param = D.resolve_param(div, beta, alpha)
    T = _check_number("temperature", temperature, positive=True)
    sw = _check_number("soft_weight", soft_weight, nonneg=True)
    hw = _check_number("hard_weight", hard_weight, nonneg=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(grad_inplace, bool):
        raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hw != 0.0 and labels is None:
        raise ValueError("hard_weight > 0 needs labels (the hard-label cross-entropy target)")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor, got "
                                 f"shape {tuple(num_items_in_batch.shape)}")
        else:
            _check_number("num_items_in_batch", num_items_in_batch, positive=True)
    distributed.check_args(process_group, vocab_start_index, backend)
    # with a process group the label range is the global vocabulary, checked by distributed
    flat_labels = _check_labels(labels, lead, student_logits.device,
                                V if process_group is None else None, int(ignore_index))
    # The teacher is a constant: no gradient flows to it.
    s3, t3 = as_rows(student_logits, teacher_logits.detach()[..., :V],
                     names=("student_logits", "teacher_logits"))
    args = (div.id, param, T, sw, hw, int(ignore_index))
    if process_group is not None:
        rows, vocab_size = distributed.vocab_parallel_rows(
            s3, t3, flat_labels, process_group, vocab_start_index, *args)
        return reduce_rows(rows, reduction, lead, vocab_size, flat_labels, int(ignore_index),
                           num_items_in_batch)
    name = backends.choose(backend, student_logits.device, student_logits.dtype)
    if name == "reference":
        rows = reference.loss_rows(s3, t3, flat_labels, *args)
    else:
        op = kd_rows_grad_inplace if grad_inplace else kd_rows
        rows, _ = op(s3, t3, flat_labels, name, *args)
    return reduce_rows(rows, reduction, lead, V, flat_labels, int(ignore_index), num_items_in_batch)


def reduce_rows(rows: Tensor, reduction: str, lead_shape, V: int, flat_labels: Optional[Tensor],
                ignore_index: int, num_items_in_batch=None) -> Tensor:
    """Reduce per-row losses (ignored rows already 0) as ``reduction`` says."""
    if reduction == "none":
        return rows.view(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        denom = (num_items_in_batch.to(device=rows.device, dtype=rows.dtype).reshape(())
                 if isinstance(num_items_in_batch, Tensor) else float(num_items_in_batch))
    elif flat_labels is None:
        denom = float(max(rows.numel(), 1))
    else:  # counted rows as a tensor: no host synchronisation; 0 rows -> 0 / 1 = 0
        denom = (flat_labels != ignore_index).sum().clamp_min(1).to(rows.dtype)
    out = total / denom
    return out / V if reduction == "mean" else out
