"""Pure-PyTorch reference backend: readable, any device, fp32 math (float64 for float64 inputs).

It is the CPU fallback and the oracle the kernels are tested against. ``row_losses`` is the
formula of DESIGN.md §2 on a block of rows, written with plain tensor ops so autograd gives the
gradients of §3. ``loss_rows`` applies it over chunks of rows under activation checkpointing, so
the reference never holds more than a few [chunk, V] fp32 buffers at a time and needs no
hand-written backward.

Zero-probability conventions: 0·log 0 = 0 and −inf logits are legal. Every log that can be −inf is
masked before it meets a product, so neither the value nor the gradient turns into NaN where a
probability is exactly zero (the "where-NaN" trap of autograd).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from . import divergences as D

_NEG_INF = float("-inf")
# Elements of fp32 work per chunk of rows (~4 MB per [chunk, V] fp32 buffer).
CHUNK_ELEMENTS = 1 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xlog_ratio(x: torch.Tensor, logx: torch.Tensor, logy: torch.Tensor) -> torch.Tensor:
    """Elementwise x·(log x − log y) with 0·(anything) = 0 and NaN-free gradients at x = 0.
    NaN in x stays NaN (the guard tests x == 0, not x > 0)."""
    zero = x == 0
    return torch.where(zero, 0.0, x * (torch.where(zero, 0.0, logx) - torch.where(zero, 0.0, logy)))


def _logaddexp(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """log(e^x1 + e^x2); −inf (with zero gradient) where both are −inf."""
    ok = (x1 > _NEG_INF) | (x2 > _NEG_INF)
    out = torch.logaddexp(torch.where(ok, x1, 0.0), torch.where(ok, x2, 0.0))
    return torch.where(ok, out, _NEG_INF)


def _log_mix(w1: float, l1: torch.Tensor, w2: float, l2: torch.Tensor) -> torch.Tensor:
    """log(w1·e^l1 + w2·e^l2) for log-probabilities l1, l2; −inf (with zero gradient) where both
    terms vanish."""
    x1 = l1 + (math.log(w1) if w1 > 0 else _NEG_INF)
    x2 = l2 + (math.log(w2) if w2 > 0 else _NEG_INF)
    return _logaddexp(x1, x2)


def teacher_log_probs(teachers, weights, temperature: float) -> torch.Tensor:
    """log p for one teacher [R, V] (weights None) or an ensemble: log Σ_m w_m softmax(t_m / T),
    accumulated teacher by teacher (never more than two [R, V] terms at a time)."""
    if isinstance(teachers, torch.Tensor):
        return torch.log_softmax(teachers / temperature, dim=-1)
    acc = None
    for w, t in zip(weights, teachers):
        if w == 0.0:
            continue  # a zero-weight teacher adds nothing (and gets a zero gradient)
        x = torch.log_softmax(t / temperature, dim=-1) + math.log(w)
        acc = x if acc is None else _logaddexp(acc, x)
    return acc


def logit_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row (1/2V) Σ (t̃ − s̃)² on row-centred logits. Columns where both are −inf are left
    out (V counts the others); −inf in only one of them gives inf or NaN."""
    keep = ~((s == _NEG_INF) & (t == _NEG_INF))
    n = keep.sum(-1, keepdim=True).clamp_min(1).to(s.dtype)
    d = torch.where(keep, t, 0.0) - torch.where(keep, s, 0.0)
    d = torch.where(keep, d - d.sum(-1, keepdim=True) / n, 0.0)  # centred t − s = t̃ − s̃
    return d.square().sum(-1) / (2.0 * n.squeeze(-1))


def divergence_terms(div_id: int, param: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-element φ(p_i, q_i) of the divergence ``div_id`` (sum over the last dim gives D)."""
    p, q = logp.exp(), logq.exp()
    if div_id == D.DIVERGENCES["forward_kl"].id:
        return _xlog_ratio(p, logp, logq)
    if div_id == D.DIVERGENCES["reverse_kl"].id:
        return _xlog_ratio(q, logq, logp)
    if div_id == D.DIVERGENCES["jsd"].id:
        beta = param
        logm = _log_mix(beta, logp, 1.0 - beta, logq)
        return beta * _xlog_ratio(p, logp, logm) + (1.0 - beta) * _xlog_ratio(q, logq, logm)
    if div_id == D.DIVERGENCES["skew_kl"].id:
        return _xlog_ratio(p, logp, _log_mix(param, logp, 1.0 - param, logq))
    if div_id == D.DIVERGENCES["skew_reverse_kl"].id:
        return _xlog_ratio(q, logq, _log_mix(param, logq, 1.0 - param, logp))
    if div_id == D.DIVERGENCES["tvd"].id:
        return 0.5 * (p - q).abs()
    raise ValueError(f"unknown divergence id {div_id}")


def row_losses(student: torch.Tensor, teacher, labels: Optional[torch.Tensor],
               div_id: int, param: float, temperature: float, soft_weight: float,
               hard_weight: float, ignore_index: int, teacher_weights=None) -> torch.Tensor:
    """Loss of each row of ``student`` [R, V] against ``teacher`` [R, >=V] (extra columns dropped).

    ``teacher`` may also be a sequence of M such tensors with ``teacher_weights`` (M floats summing
    to 1): the target is then p = Σ_m w_m softmax(t_m / T) (for ``logit_mse``, whose limit of
    T²·KL that is, the teacher logits Σ_m w_m t_m). The teacher is used as given: the caller
    detaches it unless it wants the teacher gradient.

    Returns [R] in the compute dtype; rows whose label is ``ignore_index`` give 0.
    """
    cd = compute_dtype(student.dtype)
    V = student.shape[-1]
    s = student.to(cd)
    if isinstance(teacher, torch.Tensor):
        t = teacher[..., :V].to(cd)
    else:
        if teacher_weights is None:
            teacher_weights = [1.0 / len(teacher)] * len(teacher)
        t = [x[..., :V].to(cd) for x in teacher]
    loss = torch.zeros(s.shape[:-1], dtype=cd, device=s.device)
    if soft_weight != 0.0:
        if div_id == D.DIVERGENCES["logit_mse"].id:  # no temperature, no T² (see divergences.py)
            if not isinstance(t, torch.Tensor):
                t = sum(w * x for w, x in zip(teacher_weights, t) if w != 0.0)
            loss = loss + soft_weight * logit_mse(s, t)
        else:
            logp = teacher_log_probs(t, teacher_weights, temperature)
            logq = torch.log_softmax(s / temperature, dim=-1)
            div = divergence_terms(div_id, param, logp, logq).sum(-1)
            loss = loss + (soft_weight * temperature * temperature) * div
    if labels is not None:
        valid = labels != ignore_index
        if hard_weight != 0.0:
            in_range = (labels >= 0) & (labels < V)
            idx = torch.where(in_range, labels, 0).unsqueeze(-1)
            # -log_softmax(s)[label]: the shift by the max happens before the gather, so at
            # |logits| ~ 1e4 no ulp(logsumexp) rounding enters the loss or its gradient
            ce = -torch.log_softmax(s, dim=-1).gather(-1, idx).squeeze(-1)
            # An out-of-range label that is not ignore_index has no defined loss: NaN, never a
            # silent zero or an out-of-bounds read.
            ce = torch.where(in_range, ce, float("nan"))
            loss = loss + hard_weight * ce
        loss = torch.where(valid, loss, 0.0)
    return loss


def _row_chunks(B: int, L: int, V: int):
    """Yield (b, l0, l1): chunks of rows of a [B, L, V] view, about CHUNK_ELEMENTS elements each."""
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for l0 in range(0, L, step):
            yield b, l0, min(L, l0 + step)


# ---- the reference backend ------------------------------------------------------------------

def _masked_row_losses(student, teachers, labels, args, weights, mask_teachers=False):
    """``row_losses`` on one chunk; ``teachers`` is a tuple (one tensor for a single teacher)."""
    if labels is not None:
        # Ignored rows (padding) may hold NaN or -inf: replace them so that their (discarded)
        # loss cannot leak NaN into a gradient through autograd's 0 * NaN.
        keep = (labels != args[-1]).unsqueeze(-1)
        student = torch.where(keep, student, 0.0)
        if mask_teachers:
            teachers = tuple(torch.where(keep, t, 0.0) for t in teachers)
    teacher = teachers[0] if weights is None else teachers
    return row_losses(student, teacher, labels, *args, teacher_weights=weights)


class _ChunkedRows(torch.autograd.Function):
    """Per-row losses, chunk by chunk; backward recomputes one chunk at a time under autograd and
    writes its gradients straight into preallocated buffers (no per-chunk full-size buffers).
    Teachers that need a gradient (online/mutual distillation) are leaves of the recomputation
    too."""

    @staticmethod
    def forward(ctx, student, labels, args, weights, *teachers):
        B, L, V = student.shape
        out = torch.empty(B * L, dtype=compute_dtype(student.dtype), device=student.device)
        for b, l0, l1 in _row_chunks(B, L, V):
            lab = None if labels is None else labels[b * L + l0:b * L + l1]
            out[b * L + l0:b * L + l1] = _masked_row_losses(
                student[b, l0:l1], tuple(t[b, l0:l1] for t in teachers), lab, args, weights)
        ctx.save_for_backward(student, labels, *teachers)
        ctx.args, ctx.weights = args, weights
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, labels, *teachers = ctx.saved_tensors
        want_s = ctx.needs_input_grad[0]
        want_t = [ctx.needs_input_grad[4 + m] for m in range(len(teachers))]
        B, L, V = student.shape
        grad_s = torch.empty((B, L, V), dtype=student.dtype, device=student.device) if want_s else None
        grad_t = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if w else None
                  for t, w in zip(teachers, want_t)]
        for b, l0, l1 in _row_chunks(B, L, V):
            r0, r1 = b * L + l0, b * L + l1
            lab = None if labels is None else labels[r0:r1]
            with torch.enable_grad():
                s = student[b, l0:l1].detach().requires_grad_(want_s)
                ts = tuple(t[b, l0:l1].detach().requires_grad_(w) for t, w in zip(teachers, want_t))
                leaves = ([s] if want_s else []) + [t for t, w in zip(ts, want_t) if w]
                loss = _masked_row_losses(s, ts, lab, ctx.args, ctx.weights,
                                          mask_teachers=any(want_t))
                grads = list(torch.autograd.grad(loss, leaves, grad_out[r0:r1], allow_unused=True,
                                                 materialize_grads=True))
            if want_s:
                grad_s[b, l0:l1] = grads.pop(0)
            for g, w in zip(grad_t, want_t):
                if w:
                    g[b, l0:l1] = grads.pop(0)
        return (grad_s, None, None, None) + tuple(grad_t)


def loss_rows(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
              ignore_index, teacher_weights=None) -> torch.Tensor:
    """Differentiable per-row losses of a [B, L, V] view (see ``backends.py`` for the contract).

    ``teacher`` is a [B, L, Vt >= V] view, or a sequence of M of them with ``teacher_weights``
    (an ensemble). Gradients flow to every input that requires grad, teachers included (the
    caller detaches a teacher that is a constant).

    Rows are processed in chunks: forward keeps no [chunk, V] buffer alive, and backward
    recomputes one chunk at a time, so memory stays the gradients plus O(chunk · V). Under
    torch.compile the same chunks go through activation checkpointing instead, which the
    compiler traces.
    """
    args = (div_id, param, temperature, soft_weight, hard_weight, ignore_index)
    if isinstance(teacher, torch.Tensor):
        teachers, weights = (teacher,), None
    else:
        teachers = tuple(teacher)
        weights = tuple(float(w) for w in teacher_weights) if teacher_weights is not None \
            else (1.0 / len(teachers),) * len(teachers)
    if not torch.compiler.is_compiling():
        return _ChunkedRows.apply(student, labels, args, weights, *teachers)
    B, L, V = student.shape
    mask_teachers = any(t.requires_grad for t in teachers)
    pieces = []
    for b, l0, l1 in _row_chunks(B, L, V):
        lab = None if labels is None else labels[b * L + l0:b * L + l1]
        pieces.append(checkpoint(_masked_row_losses, student[b, l0:l1],
                                 tuple(t[b, l0:l1] for t in teachers), lab, args, weights,
                                 mask_teachers, use_reentrant=False))
    if not pieces:
        return student.new_zeros((B * L,), dtype=compute_dtype(student.dtype))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# ---- the naive eager formula (benchmark baseline; holds several [N, V] fp32 buffers) --------

def eager_kd_loss(student: torch.Tensor, teacher: torch.Tensor, divergence: str = "forward_kl",
                  temperature: float = 1.0, labels=None, ignore_index: int = -100,
                  soft_weight: float = 1.0, hard_weight: float = 0.0, beta=None, alpha=None,
                  reduction: str = "batchmean") -> torch.Tensor:
    """What a user writes without this library: the DESIGN.md §2 formula on the full [N, V]
    tensors, plain autograd. Used as the baseline in benchmarks, not by the library itself."""
    div = D.get(divergence)
    param = D.resolve_param(div, beta, alpha)
    V = student.shape[-1]
    s2 = student.reshape(-1, V)
    t2 = teacher.detach()[..., :V].reshape(-1, V)
    lab = None if labels is None else labels.reshape(-1)
    rows = row_losses(s2, t2, lab, div.id, param, temperature, soft_weight, hard_weight, ignore_index)
    n = rows.numel() if lab is None else (lab != ignore_index).sum().clamp_min(1)
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows.view(student.shape[:-1])
    out = rows.sum() / n
    return out / V if reduction == "mean" else out
