"""Public functional API: argument checks, flattening, masking, reduction and backend choice.

The kernels compute one fp32 loss per row; everything above that (which rows count, how the
rows are reduced, the denominator) lives here, in plain differentiable PyTorch.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import backends
from . import distributed
from . import divergences as D
from . import reference
from .ops import has_forward_with_grad, kd_rows, kd_rows_grad_inplace, kd_rows_with_grad

__all__ = ["kd_loss", "teacher_stats", "TeacherStats", "REDUCTIONS"]

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


def check_options(div, beta, alpha, temperature, soft_weight, hard_weight, ignore_index,
                  reduction, labels, num_items_in_batch):
    """The scalar options shared by every loss entry point (kd_loss, fused_linear_kd_loss,
    sparse_kd_loss): returns (param, T, soft_weight, hard_weight) as floats, or raises a
    TypeError/ValueError naming the argument."""
    param = D.resolve_param(div, beta, alpha)
    T = _check_number("temperature", temperature, positive=True)
    sw = _check_number("soft_weight", soft_weight, nonneg=True)
    hw = _check_number("hard_weight", hard_weight, nonneg=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
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
    return param, T, sw, hw


def _check_labels(labels, lead_shape, device, V: Optional[int], ignore_index: int,
                  what: str = "logits") -> Optional[Tensor]:
    """Flat int64 labels, checked; ``what`` names the tensor the labels go with in messages.
    V is None skips the range check (a sharded loss checks the global vocabulary; feature losses
    only compare labels with ignore_index)."""
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


def _check_teachers(teacher_logits, student_logits: Tensor, teacher_weights):
    """The teachers as a list of [..., Vt] tensors and their weights (None for a single teacher).

    ``teacher_logits`` is one tensor shaped like the student, a tensor with one more leading dim
    ([M, ..., Vt], unbound without a copy), or a list/tuple of M tensors."""
    if isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits is an empty sequence; give at least one teacher")
        teachers = list(teacher_logits)
        for i, t in enumerate(teachers):
            _check_logits(f"teacher_logits[{i}]", t)
    else:
        _check_logits("teacher_logits", teacher_logits)
        if teacher_logits.dim() == student_logits.dim() + 1:
            teachers = list(teacher_logits.unbind(0))
        else:
            teachers = [teacher_logits]
    widths = {t.shape[-1] for t in teachers}
    if len(widths) > 1:
        raise ValueError(f"all teachers must have the same vocabulary width, got "
                         f"{[t.shape[-1] for t in teachers]}")
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
        weights = [_check_number(f"teacher_weights[{i}]", w, nonneg=True)
                   for i, w in enumerate(teacher_weights)]
        if abs(sum(weights) - 1.0) > 1e-5:
            raise ValueError(f"teacher_weights must sum to 1 (within 1e-5), got sum {sum(weights)!r}")
    if len(teachers) == 1:
        weights = None  # one teacher of weight 1: the ordinary single-teacher path
    return teachers, weights


def _check_token_weights(token_weights, lead_shape, device) -> Optional[Tensor]:
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
    # Value check only where it costs no device synchronisation and no graph break.
    if flat.device.type == "cpu" and not torch.compiler.is_compiling() and flat.numel():
        bad = ~(torch.isfinite(flat) & (flat >= 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"token_weights must be finite and >= 0; found {float(flat[i])!r} at "
                             f"flat position {i}")
    return flat


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "forward_kl",
            temperature: float = 1.0, labels: Optional[Tensor] = None, ignore_index: int = -100,
            soft_weight: float = 1.0, hard_weight: float = 0.0, reduction: str = "batchmean",
            num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
            beta: Optional[float] = None, alpha: Optional[float] = None,
            backend: str = "auto", token_weights: Optional[Tensor] = None,
            teacher_weights=None, teacher_requires_grad: Optional[bool] = None,
            grad_inplace: bool = False, process_group=None,
            vocab_start_index: Optional[int] = None) -> Tensor:
    """Knowledge-distillation loss between teacher and student next-token distributions.

    Per row (token): ``soft_weight · T² · D(p, q) + hard_weight · CE(softmax(s), label)`` with
    p = softmax(teacher/T), q = softmax(student/T) and D the ``divergence`` (see
    ``kdkernels.divergences``). Rows whose label equals ``ignore_index`` count for nothing.

    Args:
        student_logits: [..., V] float tensor (fp32, bf16, fp16, or float64 for the reference).
            Row-strided views such as ``logits[:, :-1]`` are used without a copy.
        teacher_logits: [..., Vt] with Vt >= V and the same leading shape and dtype; columns past
            V (a padded vocabulary) are dropped without a copy. A list/tuple of M such tensors,
            or one [M, ..., Vt] tensor, is an ensemble (see ``teacher_weights``).
        divergence: "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd" or
            "logit_mse" ((1/2V) Σ (t̃ − s̃)² on row-centred logits; temperature does not apply).
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
        token_weights: optional non-negative float tensor of the leading shape: multiplies each
            row's loss (and so its gradient); a zero weight equals masking the row. "batchmean"
            then divides by the sum of the weights of counted rows (unless num_items_in_batch).
        teacher_weights: M non-negative floats summing to 1 (default uniform) for an ensemble:
            p = Σ_m w_m softmax(t_m / T) (for "logit_mse" the teacher logits Σ_m w_m t_m).
        teacher_requires_grad: also return the gradient w.r.t. the teacher logits (online or
            mutual distillation). None: for each teacher that requires grad. False: teachers are
            constants. Only the reference backend implements it so far ("auto" picks it).
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
    teachers, tw = _check_teachers(teacher_logits, student_logits, teacher_weights)
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
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
                             f"student_logits vocabulary ({V}); the teacher may only be wider (padded)")
    if teacher_requires_grad is None:
        teacher_grad = any(t.requires_grad for t in teachers)
    elif isinstance(teacher_requires_grad, bool):
        teacher_grad = teacher_requires_grad
        if teacher_grad and not any(t.requires_grad for t in teachers):
            raise ValueError("teacher_requires_grad=True but no teacher_logits tensor requires grad")
    else:
        raise TypeError(f"teacher_requires_grad must be None or a bool, got "
                        f"{type(teacher_requires_grad).__name__}")
    div = D.get(divergence)
    param, T, sw, hw = check_options(div, beta, alpha, temperature, soft_weight, hard_weight,
                                     ignore_index, reduction, labels, num_items_in_batch)
    if not isinstance(grad_inplace, bool):
        raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__}")
    distributed.check_args(process_group, vocab_start_index, backend)
    # with a process group the label range is the global vocabulary, checked by distributed
    flat_labels = _check_labels(labels, lead, student_logits.device,
                                V if process_group is None else None, int(ignore_index))
    flat_w = _check_token_weights(token_weights, lead, student_logits.device)
    if flat_w is not None:
        # A zero weight masks its row (its loss and gradient are exactly 0, even for garbage
        # logits); the kernels see it as an ignored label. No host synchronisation.
        base = flat_labels if flat_labels is not None else torch.zeros_like(flat_w, dtype=torch.int64)
        flat_labels = torch.where(flat_w == 0, int(ignore_index), base)
    needs = {div.feature} if div.feature else set()
    if tw is not None:
        needs.add("ensemble")
    if teacher_grad:
        needs.add("teacher_grad")

    # Teachers are constants unless their gradient is asked for.
    if not teacher_grad:
        teachers = [t.detach() for t in teachers]
    s3, *t3 = as_rows(student_logits, *[t[..., :V] for t in teachers],
                      names=["student_logits"] + [f"teacher_logits[{i}]" for i in range(len(teachers))])
    args = (div.id, param, T, sw, hw, int(ignore_index))
    if process_group is not None:
        if needs:
            raise ValueError(f"process_group does not support {sorted(needs)} (ensembles, teacher "
                             "gradients and logit_mse are single-process features for now)")
        rows, vocab_size = distributed.vocab_parallel_rows(
            s3, t3[0], flat_labels, process_group, vocab_start_index, *args)
        return reduce_rows(rows, reduction, lead, vocab_size, flat_labels, int(ignore_index),
                           num_items_in_batch, token_weights=flat_w)
    name = backends.choose(backend, student_logits.device, student_logits.dtype, frozenset(needs))
    if name == "reference":
        rows = reference.loss_rows(s3, t3[0] if tw is None else t3, flat_labels, *args,
                                   teacher_weights=tw)
    else:
        op = kd_rows_grad_inplace if grad_inplace else kd_rows
        if (not grad_inplace and torch.is_grad_enabled() and s3.requires_grad
                and has_forward_with_grad(name, s3.device.type)):
            # loss and gradient in one kernel call, for the grad_loss reduce_rows will send back
            scale = _row_grad_hint((s3.shape[0] * s3.shape[1],), reduction, lead, V, flat_labels,
                                   int(ignore_index), num_items_in_batch, flat_w)
            rows, _ = kd_rows_with_grad(s3, t3[0], flat_labels, name, *args, scale)
        else:
            rows, _ = op(s3, t3[0], flat_labels, name, *args)
    return reduce_rows(rows, reduction, lead, V, flat_labels, int(ignore_index), num_items_in_batch,
                       token_weights=flat_w)


def _row_grad_hint(rows_shape, reduction: str, lead_shape, V: int, flat_labels: Optional[Tensor],
                   ignore_index: int, num_items_in_batch=None,
                   token_weights: Optional[Tensor] = None) -> Optional[Tensor]:
    """The grad_loss [N] (float32) that reduce_rows sends back to the rows when the reduced loss
    has gradient 1, obtained by differentiating reduce_rows itself on zeros (a few ops on N
    floats), so it equals autograd's value bitwise; None (ones) for reduction="none" or while
    compiling. Only a speed hint for the fused gradient: ops.scale_rows rescales whenever the
    real grad_loss differs. A hint that is not finite, or 0 on a row that is not masked, becomes 1
    (a masked row's gradient is 0 whatever its scale)."""
    if reduction == "none" or torch.compiler.is_compiling():
        return None
    with torch.enable_grad():
        r = torch.zeros(rows_shape, dtype=torch.float32, requires_grad=True)
        out = reduce_rows(r, reduction, lead_shape, V, flat_labels, ignore_index,
                          num_items_in_batch, token_weights=token_weights)
        (g,) = torch.autograd.grad(out, r)
    g = g.detach().contiguous()
    ok = g != 0 if flat_labels is None else (g != 0) | (flat_labels == ignore_index)
    return torch.where(torch.isfinite(g) & ok, g, 1.0)


def reduce_rows(rows: Tensor, reduction: str, lead_shape, V: int, flat_labels: Optional[Tensor],
                ignore_index: int, num_items_in_batch=None,
                token_weights: Optional[Tensor] = None) -> Tensor:
    """Reduce per-row losses (ignored rows already 0) as ``reduction`` says.

    ``token_weights`` ([N], optional) multiply the rows first; "batchmean" then divides by the sum
    of the weights of counted rows (unless ``num_items_in_batch``), 0 / 0 giving 0."""
    if token_weights is not None:
        w = token_weights.to(rows.dtype)
        if flat_labels is not None:
            w = torch.where(flat_labels != ignore_index, w, 0.0)
        rows = rows * w
    if reduction == "none":
        return rows.view(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        denom = (num_items_in_batch.to(device=rows.device, dtype=rows.dtype).reshape(())
                 if isinstance(num_items_in_batch, Tensor) else float(num_items_in_batch))
    elif token_weights is not None:  # sum of the counted weights, as a tensor (no sync)
        wsum = w.sum()
        denom = torch.where(wsum > 0, wsum, 1.0)
    elif flat_labels is None:
        denom = float(max(rows.numel(), 1))
    else:  # counted rows as a tensor: no host synchronisation; 0 rows -> 0 / 1 = 0
        denom = (flat_labels != ignore_index).sum().clamp_min(1).to(rows.dtype)
    out = total / denom
    return out / V if reduction == "mean" else out


class TeacherStats(NamedTuple):
    """Per-row statistics of softmax(t / T): ``lse`` = logsumexp(t / T), ``entropy`` = −Σ p log p
    (nats), ``max_prob`` = max_i p_i. Each has the leading shape of the logits."""
    lse: Tensor
    entropy: Tensor
    max_prob: Tensor


# Columns per block of the online pass in teacher_stats.
STATS_BLOCK = 4096


@torch.no_grad()
def teacher_stats(teacher_logits: Tensor, temperature: float = 1.0,
                  vocab_size: Optional[int] = None) -> TeacherStats:
    """Log-sum-exp, entropy and maximum probability of each row of softmax(teacher_logits / T),
    in one pass over the vocabulary, for building teacher-confidence ``token_weights``.

    Rows are processed in chunks and each chunk in blocks of columns, merged online as
    (m, z, y) with z = Σ e^{a−m} and y = Σ e^{a−m}(a − m); so no [N, V] fp32 buffer exists, and
    entropy = log z − y / z and max_prob = 1 / z need no subtraction of large numbers.
    ``vocab_size`` uses only the first columns (a padded teacher vocabulary). −inf logits are
    legal (probability 0); a row that is entirely −inf gives lse −inf and NaN entropy/max_prob.
    Results are float32 (float64 for float64 logits) and carry no gradient.
    """
    _check_logits("teacher_logits", teacher_logits)
    T = _check_number("temperature", temperature, positive=True)
    V = teacher_logits.shape[-1]
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) \
                or not 1 <= vocab_size <= V:
            raise ValueError(f"vocab_size must be an int in [1, {V}], got {vocab_size!r}")
        V = int(vocab_size)
    lead = teacher_logits.shape[:-1]
    t3 = as_rows(teacher_logits[..., :V], names=["teacher_logits"])
    B, L, _ = t3.shape
    cd = reference.compute_dtype(teacher_logits.dtype)
    out = torch.empty((3, B, L), dtype=cd, device=teacher_logits.device)
    block = min(V, STATS_BLOCK)
    rows = max(1, reference.CHUNK_ELEMENTS // block)
    for b in range(B):
        for l0 in range(0, L, rows):
            l1 = min(L, l0 + rows)
            m = torch.full((l1 - l0,), float("-inf"), dtype=cd, device=out.device)
            z = torch.zeros_like(m)
            y = torch.zeros_like(m)
            for v0 in range(0, V, block):
                a = t3[b, l0:l1, v0:v0 + block].to(cd) / T
                mb = a.amax(-1)
                m_new = torch.maximum(m, mb)
                safe = torch.where(m_new > float("-inf"), m_new, 0.0)  # all −inf so far
                x = a - safe.unsqueeze(-1)
                e = x.exp()
                zb = e.sum(-1)
                yb = torch.where(e > 0, e * x, 0.0).sum(-1)
                # rescale the old (m, z, y) to the new maximum: y' = e^{m−m'}(y + (m − m')z)
                r = (m - safe).exp()
                y = r * (y + torch.where(z > 0, (m - safe) * z, 0.0)) + yb
                z = r * z + zb
                m = m_new
            out[0, b, l0:l1] = m + z.log()
            out[1, b, l0:l1] = z.log() - y / z
            out[2, b, l0:l1] = 1.0 / z
    out = out.view(3, *lead)
    return TeacherStats(out[0], out[1], out[2])
