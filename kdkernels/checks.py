"""Every argument check of the public API, and the row view the kernels take.

Each check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (wrong value) that names
the argument. Checks that need tensor values run only where they cost no device synchronisation
and no graph break (CPU tensors, eager mode); see docs/precision.md for what happens otherwise.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import astuple, dataclass
from typing import Optional

import torch
from torch import Tensor

from . import divergences as D

__all__ = ["Options", "REDUCTIONS", "check_number", "check_int", "check_float_tensor",
           "check_reduction", "check_same_rows", "check_options", "check_labels", "check_teachers",
           "check_token_weights", "check_num_items", "mask_zero_weights", "check_linear", "as_rows",
           "compute_dtype"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


@dataclass(frozen=True)
class Options:
    """The checked scalar options of one loss call, in the order of the op schemas."""
    div_id: int
    param: float          # β for jsd, α for the skew divergences, else 0
    temperature: float
    soft_weight: float
    hard_weight: float
    ignore_index: int

    def scalars(self) -> tuple:
        """The six scalars as the custom ops and the backend contract take them."""
        return astuple(self)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but float64 (the oracle's and gradcheck's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_number(name: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
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


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_float_tensor(name: str, x, *, last: str = "V", dim: Optional[int] = None) -> None:
    """A floating-point tensor of shape [..., last] with last >= 1 (exactly ``dim`` dims when
    given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., {last}] with {last} >= 1, got "
                         f"{tuple(x.shape)}")


def check_same_rows(tname: str, t: Tensor, sname: str, s: Tensor) -> None:
    """Teacher-side tensor ``t`` has the leading shape and device of the student-side ``s``."""
    if t.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"{tname} leading shape {tuple(t.shape[:-1])} differs from {sname} "
                         f"leading shape {tuple(s.shape[:-1])}")
    if t.device != s.device:
        raise ValueError(f"{tname} is on {t.device} but {sname} is on {s.device}")


def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_num_items(num_items_in_batch, reduction: Optional[str] = None) -> None:
    """``num_items_in_batch`` is the denominator of "batchmean" (and of "mean", which is batchmean
    / V). It has no meaning for "sum" (the undivided total) or "none" (per-row values): given with
    either, it is an error rather than silently ignored. (TRL's ``generalized_jsd_loss`` divides by
    it whatever the reduction; ``integrations.trl`` reproduces that itself.)"""
    if num_items_in_batch is None:
        return
    if reduction in ("sum", "none"):
        raise ValueError(f"num_items_in_batch does not apply to reduction={reduction!r}: it is the "
                         f"denominator of reduction='batchmean' (and 'mean'); pass "
                         f"reduction='batchmean' to divide the sum by num_items_in_batch, or drop "
                         f"num_items_in_batch for the plain {reduction!r}")
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError("num_items_in_batch must be a number or a one-element tensor, got "
                             f"shape {tuple(num_items_in_batch.shape)}")
    else:
        check_number("num_items_in_batch", num_items_in_batch, positive=True)


def check_options(divergence, beta=None, alpha=None, temperature=1.0, soft_weight=1.0,
                  hard_weight=0.0, ignore_index=-100, reduction="batchmean", labels=None,
                  num_items_in_batch=None, *, need_labels_for_hard: bool = True) -> Options:
    """The scalar options shared by every loss entry point and module (kd_loss, KDLoss,
    fused_linear_kd_loss, sparse_kd_loss), checked once: returns them as ``Options``."""
    div = D.get(divergence)
    param = D.resolve_param(div, beta, alpha)
    T = check_number("temperature", temperature, positive=True)
    sw = check_number("soft_weight", soft_weight, nonneg=True)
    hw = check_number("hard_weight", hard_weight, nonneg=True)
    ii = check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    if hw != 0.0 and labels is None and need_labels_for_hard:
        raise ValueError("hard_weight > 0 needs labels (the hard-label cross-entropy target)")
    check_num_items(num_items_in_batch, reduction)
    div_id = div.id
    if param == 0.0 and div_id in (D.SKEW_KL, D.SKEW_REVERSE_KL):
        # alpha = 0 is exactly forward (reverse) KL: computed as such, so that it has the same
        # values and, where the student (teacher) has -inf under the other's mass, the same
        # gradient (docs/precision.md) instead of the mixture form's 0/0 there
        div_id = D.FORWARD_KL if div_id == D.SKEW_KL else D.REVERSE_KL
    return Options(div_id, param, T, sw, hw, ii)


def check_labels(labels, lead_shape, device, V: Optional[int], ignore_index: int,
                 what: str = "logits") -> Optional[Tensor]:
    """Flat int64 labels, checked; ``what`` names the tensor the labels go with in messages.
    V is None skips the range check (a sharded loss checks the global vocabulary; feature losses
    only compare labels with ignore_index). The result is contiguous: a view is reshaped without a
    copy where it can be, and a strided view (``labels[:, -1]``, a one-position chunk) costs one
    copy of the N labels (8 bytes per row, never a copy of logits), so every kernel can take the
    labels at unit stride."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have the leading shape of the {what} {tuple(lead_shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the {what} are on {device}")
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    if V is not None and flat.device.type == "cpu" and not torch.compiler.is_compiling() \
            and flat.numel():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                             f"found {int(flat[i])} at flat position {i}")
    return flat


def check_teachers(teacher_logits, student_logits: Tensor, teacher_weights):
    """The teachers as a list of [..., Vt] tensors and their weights (None for a single teacher).

    ``teacher_logits`` is one tensor shaped like the student, a tensor with one more leading dim
    ([M, ..., Vt], unbound without a copy), or a list/tuple of M tensors. Each teacher must match
    the student in dtype, device and leading shape and be at least as wide."""
    if isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits is an empty sequence; give at least one teacher")
        teachers = list(teacher_logits)
        for i, t in enumerate(teachers):
            check_float_tensor(f"teacher_logits[{i}]", t)
    else:
        check_float_tensor("teacher_logits", teacher_logits)
        if teacher_logits.dim() == student_logits.dim() + 1:
            teachers = list(teacher_logits.unbind(0))
        else:
            teachers = [teacher_logits]
    widths = {t.shape[-1] for t in teachers}
    if len(widths) > 1:
        raise ValueError(f"all teachers must have the same vocabulary width, got "
                         f"{[t.shape[-1] for t in teachers]}")
    V, lead = student_logits.shape[-1], student_logits.shape[:-1]
    for i, t in enumerate(teachers):
        tname = "teacher_logits" if len(teachers) == 1 else f"teacher_logits[{i}]"
        if t.dtype != student_logits.dtype:
            raise TypeError(f"{tname} dtype {t.dtype} differs from student_logits "
                            f"dtype {student_logits.dtype}; cast one of them")
        if t.device != student_logits.device:
            raise ValueError(f"{tname} are on {t.device} but student_logits are on "
                             f"{student_logits.device}")
        if t.shape[:-1] != lead:
            raise ValueError(f"{tname} leading shape {tuple(t.shape[:-1])} differs "
                             f"from student_logits leading shape {tuple(lead)}")
        if t.shape[-1] < V:
            raise ValueError(f"{tname} vocabulary ({t.shape[-1]}) is smaller than "
                             f"student_logits vocabulary ({V}); the teacher may only be wider "
                             "(padded)")
    if teacher_weights is None:
        weights = None if len(teachers) == 1 else [1.0 / len(teachers)] * len(teachers)
    else:
        if isinstance(teacher_weights, Tensor):
            if teacher_weights.dim() != 1 or teacher_weights.device.type != "cpu":
                raise ValueError("teacher_weights must be a sequence of floats or a 1-D CPU tensor")
            teacher_weights = teacher_weights.tolist()
        if not isinstance(teacher_weights, (list, tuple)):
            raise TypeError(f"teacher_weights must be a sequence of floats, got "
                            f"{type(teacher_weights).__name__}")
        if len(teacher_weights) != len(teachers):
            raise ValueError(f"teacher_weights has {len(teacher_weights)} entries for "
                             f"{len(teachers)} teachers")
        weights = [check_number(f"teacher_weights[{i}]", w, nonneg=True)
                   for i, w in enumerate(teacher_weights)]
        if abs(sum(weights) - 1.0) > 1e-5:
            raise ValueError(f"teacher_weights must sum to 1 (within 1e-5), got sum {sum(weights)!r}")
    if len(teachers) == 1:
        weights = None  # one teacher of weight 1: the ordinary single-teacher path
    return teachers, weights


def check_token_weights(token_weights, lead_shape, device) -> Optional[Tensor]:
    """[N] view of the per-row weights (None when not given), checked."""
    if token_weights is None:
        return None
    if not isinstance(token_weights, Tensor):
        raise TypeError(f"token_weights must be a torch.Tensor or None, got "
                        f"{type(token_weights).__name__}")
    if not token_weights.is_floating_point():
        raise TypeError(f"token_weights must be a floating-point tensor, got dtype "
                        f"{token_weights.dtype}")
    if tuple(token_weights.shape) != tuple(lead_shape):
        raise ValueError(f"token_weights must have the leading shape of the logits "
                         f"{tuple(lead_shape)}, got {tuple(token_weights.shape)}")
    if token_weights.device != device:
        raise ValueError(f"token_weights are on {token_weights.device} but the logits are on {device}")
    flat = token_weights.reshape(-1)
    if flat.device.type == "cpu" and not torch.compiler.is_compiling() and flat.numel():
        bad = ~(torch.isfinite(flat) & (flat >= 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"token_weights must be finite and >= 0; found {float(flat[i])!r} at "
                             f"flat position {i}")
    return flat


def mask_zero_weights(flat_labels: Optional[Tensor], flat_w: Optional[Tensor],
                      ignore_index: int) -> Optional[Tensor]:
    """Labels with rows of token weight 0 turned into ``ignore_index``: a zero weight masks its row
    (its loss and gradient are exactly 0, even for garbage logits). No host synchronisation."""
    if flat_w is None:
        return flat_labels
    base = flat_labels if flat_labels is not None else torch.zeros_like(flat_w, dtype=torch.int64)
    return torch.where(flat_w == 0, ignore_index, base)


def check_linear(prefix: str, h, w, b) -> None:
    """Hidden states [..., D], weight [V, D] and optional bias [V] of one lm_head."""
    check_float_tensor(f"{prefix}_hidden", h, last="D")
    check_float_tensor(f"{prefix}_weight", w, last="D", dim=2)
    if w.shape[0] < 1:
        raise ValueError(f"{prefix}_weight must have at least one row (vocabulary entry), got "
                         f"shape {tuple(w.shape)}")
    if h.shape[-1] != w.shape[1]:
        raise ValueError(f"{prefix}_hidden width {h.shape[-1]} differs from {prefix}_weight width "
                         f"{w.shape[1]} (weight is [vocab, hidden])")
    if w.dtype != h.dtype:
        raise TypeError(f"{prefix}_weight dtype {w.dtype} differs from {prefix}_hidden dtype "
                        f"{h.dtype}")
    if w.device != h.device:
        raise ValueError(f"{prefix}_weight is on {w.device} but {prefix}_hidden is on {h.device}")
    if b is not None:
        check_float_tensor(f"{prefix}_bias", b, dim=1)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{prefix}_bias must have shape ({w.shape[0]},), got "
                             f"{tuple(b.shape)}")
        if b.dtype != w.dtype or b.device != w.device:
            raise TypeError(f"{prefix}_bias must match {prefix}_weight in dtype and device, got "
                            f"{b.dtype} on {b.device}")


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
