"""Distillation from stored top-k teacher log-probabilities (offline, sparse teacher).

The teacher is given per row (token) as K pairs (index, log-probability) of its tempered
distribution p = softmax(t / T), e.g. written once by ``kdkernels.topk.dump_topk``. The student
keeps its full distribution q = softmax(s / T) over the V columns. Two ways to compare them:

``tail="renormalize"``
    Both distributions are restricted to the row's K indices and renormalized there; the
    divergence is taken over K outcomes. The student side needs only the K gathered logits.
``tail="bucket"``
    K + 1 outcomes: the K entries plus one tail outcome holding the rest of the mass,
    1 − Σ_k p_k for the teacher and 1 − Σ_k q_k for the student (computed in log space as
    log1p(−exp(·)) / log(−expm1(·))). Both tail masses are floored at ``TAIL_FLOOR`` = 2⁻²⁴: below
    that, 1 − Σ is rounding noise in fp32, and a zero tail on one side against a noise tail on the
    other would give an infinite divergence. The student side needs the full-row log-sum-exp of
    s / T and the K gathered logits.

Unused slots (index −1, or log-probability −inf) are ignored: they are not outcomes (in bucket
mode their teacher mass, if any, is part of the tail). A row without any used slot has a soft
loss of 0. Two used slots of one row with the same index are an error, checked on CPU tensors
only (on GPU the check would cost a host synchronisation; the result is then undefined).

Everything else follows ``kd_loss``: T divides the student logits (the stored teacher
log-probabilities are already tempered), the soft term is multiplied by T², the hard
cross-entropy is at T = 1, labels equal to ``ignore_index`` mask rows, and the reductions and
the zero-counted-rows rule are those of ``kdkernels.reduction``.

Compute: a backend returns, per row, the log-sum-exp of s / T (bucket mode only) and of s (hard
term only), s[label], and the K gathered logits; a small differentiable "head" in PyTorch turns
these [N, K] numbers into row losses. The student gradient is dense only through the log-sum-exp
terms: grad_j = c_B/T · softmax(s/T)_j + c_A · softmax(s)_j + Σ_k g_k [j = idx_k] + g_l [j = label],
written chunk by chunk (reference) or block by block (Triton, C++ CPU); no [N, V] fp32 tensor
exists.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from .. import divergences as D
from ..checks import as_rows, check_float_tensor, check_labels, check_options, compute_dtype
from ..ops.sparse import sparse_stats
from ..reduction import reduce_rows

__all__ = ["sparse_kd_loss", "TAILS", "TAIL_FLOOR"]

TAILS = ("renormalize", "bucket")
TAIL_FLOOR = 2.0 ** -24
_LOG1M_FLOOR = math.log1p(-TAIL_FLOOR)   # tail >= floor  <=>  log(sum of the K masses) <= this
_NEG_INF = float("-inf")
_LN2 = math.log(2.0)
# CPU check of bucket-mode inputs: a row's teacher mass above 1 + this is not a distribution.
_MASS_SLACK = 1e-2


# ---- the per-row head on [N, K] ----------------------------------------------------------

def _masked_lse(x: Tensor, valid: Tensor, has: Tensor) -> Tensor:
    """log Σ_{valid} e^x per row; −inf (with zero gradient) for rows without a valid entry."""
    xm = torch.where(valid, x, _NEG_INF)
    xm = torch.where(has.unsqueeze(1), xm, 0.0)
    return torch.where(has, torch.logsumexp(xm, dim=1), _NEG_INF)


def _log1m_exp_floored(x: Tensor) -> Tensor:
    """log(max(1 − e^x, TAIL_FLOOR)) for x <= 0 (x = log of the mass of the K entries)."""
    x = x.clamp_max(_LOG1M_FLOOR)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _soft_divergence(gathered, lse_t, lp, valid, div_id, param, T, tail):
    has = valid.any(dim=1)
    b = gathered * (1.0 / T)   # the same product as the kernels: b is consistent with lse(b)
    Lq = _masked_lse(b, valid, has)      # log Σ_K exp(s/T)
    Lp = _masked_lse(lp, valid, has)     # log Σ_K p  (log of the teacher's mass on the K entries)
    if tail == "renormalize":
        logq = torch.where(valid, b - Lq.unsqueeze(1), _NEG_INF)
        logp = torch.where(valid, lp - Lp.unsqueeze(1), _NEG_INF)
    else:
        logq = torch.where(valid, b - lse_t.unsqueeze(1), _NEG_INF)
        logp = torch.where(valid, lp, _NEG_INF)
        logq = torch.cat([logq, _log1m_exp_floored(Lq - lse_t).unsqueeze(1)], dim=1)
        logp = torch.cat([logp, _log1m_exp_floored(Lp).unsqueeze(1)], dim=1)
    return D.terms(div_id, param, logp, logq).sum(dim=1)


# ---- argument checks --------------------------------------------------------------------

def _check_teacher(idx, lp, lead, K_device, V: int):
    if not isinstance(idx, Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(idx).__name__}")
    if not isinstance(lp, Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got {type(lp).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"teacher_indices must be an integer tensor (int64 or int32), got dtype "
                        f"{idx.dtype}")
    if not lp.is_floating_point():
        raise TypeError(f"teacher_logprobs must be a floating-point tensor, got dtype {lp.dtype}")
    if idx.shape != lp.shape:
        raise ValueError(f"teacher_indices shape {tuple(idx.shape)} differs from teacher_logprobs "
                         f"shape {tuple(lp.shape)}")
    if idx.dim() < 1 or idx.shape[-1] < 1 or tuple(idx.shape[:-1]) != tuple(lead):
        raise ValueError(f"teacher_indices must have shape [..., K] with K >= 1 and the leading "
                         f"shape of student_logits {tuple(lead)}, got {tuple(idx.shape)}")
    for name, x in (("teacher_indices", idx), ("teacher_logprobs", lp)):
        if x.device != K_device:
            raise ValueError(f"{name} are on {x.device} but student_logits are on {K_device}")


def duplicate_rows(idx2: Tensor, used: Tensor) -> Tensor:
    """[N] bool: rows where two used slots name the same column. Device-side (a sort of the
    [N, K] indices, no host synchronisation): on GPU such rows get a NaN loss; on CPU
    ``_check_teacher_values`` refuses them with an error."""
    K = idx2.shape[1]
    if K < 2:
        return torch.zeros(idx2.shape[0], dtype=torch.bool, device=idx2.device)
    # unused slots get distinct negative sentinels, so only used slots can collide
    sentinel = -2 - torch.arange(K, device=idx2.device).expand_as(idx2)
    srt = torch.where(used, idx2, sentinel).sort(dim=1).values
    return (srt[:, 1:] == srt[:, :-1]).any(dim=1)


def _check_teacher_values(idx2: Tensor, used: Tensor, lp2: Tensor, V: int, tail: str) -> None:
    """Checks that need the values: CPU only (on GPU they would synchronise with the host)."""
    if idx2.device.type != "cpu" or torch.compiler.is_compiling() or idx2.numel() == 0:
        return
    bad = (idx2 != -1) & ((idx2 < 0) | (idx2 >= V))
    if bool(bad.any()):
        r, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"teacher_indices must lie in [0, {V}) or be -1 (unused slot); found "
                         f"{int(idx2[r, k])} at row {r}, slot {k}")
    K = idx2.shape[1]
    if K > 1:
        # unused slots get distinct negative sentinels, so only used slots can collide
        sentinel = -2 - torch.arange(K, device=idx2.device).expand_as(idx2)
        srt = torch.where(used, idx2, sentinel).sort(dim=1).values
        dup = srt[:, 1:] == srt[:, :-1]
        if bool(dup.any()):
            r, k = (int(v) for v in dup.nonzero()[0])
            raise ValueError(f"teacher_indices has a duplicate index {int(srt[r, k])} in row {r}; "
                             "each used slot of a row must name a different column")
    if tail == "bucket":
        mass = torch.where(used, lp2.double().exp(), 0.0).sum(dim=1)
        over = mass > 1.0 + _MASS_SLACK
        if bool(over.any()):
            r = int(over.nonzero()[0, 0])
            raise ValueError(f"teacher_logprobs of row {r} hold probability mass {float(mass[r]):.4g} "
                             "> 1: they must be log-probabilities (log_softmax of the tempered "
                             "teacher), not logits")


# ---- public API ---------------------------------------------------------------------------

def sparse_kd_loss(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, *,
                   tail: str = "renormalize", divergence: str = "forward_kl",
                   temperature: float = 1.0, labels: Optional[Tensor] = None,
                   ignore_index: int = -100, soft_weight: float = 1.0, hard_weight: float = 0.0,
                   reduction: str = "batchmean",
                   num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
                   beta: Optional[float] = None, alpha: Optional[float] = None,
                   backend: str = "auto") -> Tensor:
    """Distillation loss against a teacher stored as top-k (index, log-probability) pairs.

    Per row: ``soft_weight · T² · D(p̂, q̂) + hard_weight · CE(softmax(s), label)`` where p̂, q̂
    are the teacher's and the student's distributions over the K outcomes
    (``tail="renormalize"``) or the K + 1 outcomes (``tail="bucket"``) described in the module
    docstring.

    Args:
        student_logits: [..., V] float tensor (fp32, bf16, fp16; float64 with the reference
            backend). Row-strided views such as ``logits[:, :-1]`` are used without a copy.
        teacher_indices: [..., K] integer tensor (int64 or int32): the teacher's top-k columns,
            −1 for an unused slot. Used slots of a row must be distinct (checked on CPU).
        teacher_logprobs: [..., K] float tensor (any float dtype, e.g. fp16 as stored): the
            log-probabilities of the teacher's distribution at temperature ``temperature``
            (already tempered); −inf marks an unused slot. Treated as a constant.
        tail: "renormalize" or "bucket".
        divergence, temperature, labels, ignore_index, soft_weight, hard_weight, reduction,
        num_items_in_batch, beta, alpha: as in ``kdkernels.kd_loss``; ``temperature`` divides the
            student logits only.
        backend: "auto" (Triton on CUDA tensors, the C++ kernels on CPU fp32/bf16/fp16 tensors
            when built, else the reference), "reference", "triton" or "cpu".

    Returns:
        A float32 tensor (float64 for float64 student logits): a scalar, or the leading shape for
        ``reduction="none"``.
    """
    check_float_tensor("student_logits", student_logits)
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    _check_teacher(teacher_indices, teacher_logprobs, lead, student_logits.device, V)
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    opts = check_options(divergence, beta, alpha, temperature, soft_weight, hard_weight,
                         ignore_index, reduction, labels, num_items_in_batch)
    T, sw, hw, ignore_index = opts.temperature, opts.soft_weight, opts.hard_weight, opts.ignore_index
    flat_labels = check_labels(labels, lead, student_logits.device, V, ignore_index)
    name = backends.choose(backend, student_logits.device, student_logits.dtype, {"sparse"},
                           "sparse_kd_loss")

    cd = compute_dtype(student_logits.dtype)
    K = teacher_indices.shape[-1]
    idx2 = teacher_indices.detach().reshape(-1, K).to(torch.int64)
    lp2 = teacher_logprobs.detach().reshape(-1, K).to(cd)
    used = (idx2 != -1) & (lp2 != _NEG_INF)
    _check_teacher_values(idx2, used, lp2, V, tail)
    bad_slot = used & ((idx2 < 0) | (idx2 >= V))        # only reachable on GPU: NaN, not a read
    valid = used & ~bad_slot
    idx_k = torch.where(valid, idx2, -1).contiguous()   # what the kernels see: -1 = skip

    need_soft = sw != 0.0
    need_b = need_soft and tail == "bucket"
    need_a = hw != 0.0
    s3 = as_rows(student_logits, names=("student_logits",))
    stats, gathered = sparse_stats(s3, idx_k, flat_labels if need_a else None, T, need_b, need_a,
                                   name)
    lse_t, lse_1, s_lab = stats.unbind(1)

    ok = None if flat_labels is None else flat_labels != ignore_index
    if ok is not None:  # ignored rows: sanitise every input of the head (zero, NaN-free grads)
        valid = valid & ok.unsqueeze(1)
        lse_t, lse_1, s_lab = (torch.where(ok, x, 0.0) for x in (lse_t, lse_1, s_lab))
        gathered = torch.where(ok.unsqueeze(1), gathered, 0.0)
    rows = torch.zeros(idx2.shape[0], dtype=cd, device=student_logits.device)
    if need_soft:
        lp_safe = torch.where(valid, lp2, 0.0)
        rows = rows + (sw * T * T) * _soft_divergence(gathered, lse_t, lp_safe, valid, opts.div_id,
                                                      opts.param, T, tail)
    if need_a:
        in_range = (flat_labels >= 0) & (flat_labels < V)
        ce = torch.where(in_range, lse_1 - s_lab, float("nan"))
        rows = rows + hw * ce
    bad_row = bad_slot.any(dim=1)
    if idx2.device.type != "cpu":  # on CPU, _check_teacher_values has refused duplicates
        bad_row = bad_row | duplicate_rows(idx2, used)
    rows = torch.where(bad_row, float("nan"), rows)
    if ok is not None:
        rows = torch.where(ok, rows, 0.0)
    return reduce_rows(rows, reduction, lead, V, flat_labels, ignore_index, num_items_in_batch)
