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


def _log_mix(w1: float, l1: torch.Tensor, w2: float, l2: torch.Tensor) -> torch.Tensor:
    """log(w1·e^l1 + w2·e^l2) for log-probabilities l1, l2; −inf (with zero gradient) where both
    terms vanish."""
    x1 = l1 + (math.log(w1) if w1 > 0 else _NEG_INF)
    x2 = l2 + (math.log(w2) if w2 > 0 else _NEG_INF)
    ok = (x1 > _NEG_INF) | (x2 > _NEG_INF)
    out = torch.logaddexp(torch.where(ok, x1, 0.0), torch.where(ok, x2, 0.0))
    return torch.where(ok, out, _NEG_INF)


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


def row_losses(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
               div_id: int, param: float, temperature: float, soft_weight: float,
               hard_weight: float, ignore_index: int) -> torch.Tensor:
    """Loss of each row of ``student`` [R, V] against ``teacher`` [R, >=V] (extra columns dropped).

    Returns [R] in the compute dtype; rows whose label is ``ignore_index`` give 0.
    """
    cd = compute_dtype(student.dtype)
    V = student.shape[-1]
    s = student.to(cd)
    t = teacher[..., :V].to(cd).detach()
    loss = torch.zeros(s.shape[:-1], dtype=cd, device=s.device)
    if soft_weight != 0.0:
        logp = torch.log_softmax(t / temperature, dim=-1)
        logq = torch.log_softmax(s / temperature, dim=-1)
        div = divergence_terms(div_id, param, logp, logq).sum(-1)
        loss = loss + (soft_weight * temperature * temperature) * div
    if labels is not None:
        valid = labels != ignore_index
        if hard_weight != 0.0:
            in_range = (labels >= 0) & (labels < V)
            idx = torch.where(in_range, labels, 0).unsqueeze(-1)
            ce = torch.logsumexp(s, dim=-1) - s.gather(-1, idx).squeeze(-1)
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

def _masked_row_losses(student, teacher, labels, *args):
    if labels is not None:
        # Ignored rows (padding) may hold NaN or -inf: replace them so that their (discarded)
        # loss cannot leak NaN into the gradient through autograd's 0 * NaN.
        ignore_index = args[-1]
        student = torch.where((labels != ignore_index).unsqueeze(-1), student, 0.0)
    return row_losses(student, teacher, labels, *args)


class _ChunkedRows(torch.autograd.Function):
    """Per-row losses, chunk by chunk; backward recomputes one chunk at a time under autograd and
    writes its gradient straight into one preallocated buffer (no per-chunk full-size buffers)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, *args):
        B, L, V = student.shape
        out = torch.empty(B * L, dtype=compute_dtype(student.dtype), device=student.device)
        for b, l0, l1 in _row_chunks(B, L, V):
            lab = None if labels is None else labels[b * L + l0:b * L + l1]
            out[b * L + l0:b * L + l1] = _masked_row_losses(student[b, l0:l1], teacher[b, l0:l1],
                                                            lab, *args)
        ctx.save_for_backward(student, teacher, labels)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, labels = ctx.saved_tensors
        B, L, V = student.shape
        grad = torch.empty((B, L, V), dtype=student.dtype, device=student.device)
        for b, l0, l1 in _row_chunks(B, L, V):
            r0, r1 = b * L + l0, b * L + l1
            lab = None if labels is None else labels[r0:r1]
            with torch.enable_grad():
                s = student[b, l0:l1].detach().requires_grad_(True)
                loss = _masked_row_losses(s, teacher[b, l0:l1], lab, *ctx.args)
                (grad[b, l0:l1],) = torch.autograd.grad(loss, s, grad_out[r0:r1])
        return (grad, None, None) + (None,) * len(ctx.args)


def loss_rows(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
              ignore_index) -> torch.Tensor:
    """Differentiable per-row losses of a [B, L, V] view (see ``backends.py`` for the contract).

    Rows are processed in chunks: forward keeps no [chunk, V] buffer alive, and backward
    recomputes one chunk at a time, so memory stays one gradient plus O(chunk · V). Under
    torch.compile the same chunks go through activation checkpointing instead, which the
    compiler traces.
    """
    args = (div_id, param, temperature, soft_weight, hard_weight, ignore_index)
    if not torch.compiler.is_compiling():
        return _ChunkedRows.apply(student, teacher, labels, *args)
    B, L, V = student.shape
    pieces = []
    for b, l0, l1 in _row_chunks(B, L, V):
        lab = None if labels is None else labels[b * L + l0:b * L + l1]
        pieces.append(checkpoint(_masked_row_losses, student[b, l0:l1], teacher[b, l0:l1], lab,
                                 *args, use_reentrant=False))
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
    t2 = teacher[..., :V].reshape(-1, V)
    lab = None if labels is None else labels.reshape(-1)
    rows = row_losses(s2, t2, lab, div.id, param, temperature, soft_weight, hard_weight, ignore_index)
    n = rows.numel() if lab is None else (lab != ignore_index).sum().clamp_min(1)
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows.view(student.shape[:-1])
    out = rows.sum() / n
    return out / V if reduction == "mean" else out
