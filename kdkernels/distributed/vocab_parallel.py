"""Vocab-parallel (tensor-parallel) distillation loss over ``torch.distributed``.

When the lm_head is sharded over the vocabulary (Megatron-style tensor parallelism), every rank of
the tensor-parallel group holds the same rows but only a V-shard of the student and teacher logits
``[..., V_local]``. This module computes the exact full-vocabulary loss of DESIGN.md §2 from the
shards; the gradient w.r.t. the local student shard is produced locally.

Per row, with a = t/T, b = s/T and each rank r holding the columns [o_r, o_r + V_r):

1. statistics pass over the local shard: the log-sum-exps of a, b (and of s for the hard term),
   each as a pair (m_r, z_r) = (max, log Σ e^{x − max}) so that log-probabilities (x − M) − Z stay
   exact for large logits; the label logit s[label] on the rank that owns the label (0
   elsewhere); for forward and reverse KL a local loss term (below). One ``all_gather`` of these
   per-row values; every rank merges them identically: M = max_r m_r,
   Z = log Σ_r e^{m_r − M + z_r} (so A = M_a + Z_a, etc.), s[label] = Σ_r (label logit of r).
   Forward KL rides along: with the shard-local distributions p̂, q̂ (softmax over the shard),
   KL(p‖q) = Σ_r e^{A_r − A} · [Σ_shard p̂ (log p̂ − log q̂) + (A_r − A) − (B_r − B)];
   reverse KL is the mirror image. A shard without teacher (student) mass contributes 0.
2. other divergences: a pass over the local shard with the global statistics forms log p, log q,
   Σ φ(p, q) and the partial c_r = Σ_shard q·g (g = ∂φ/∂q); one ``all_reduce`` SUM of
   (Σ φ, c_r) per row. For forward and reverse KL, c needs no communication
   (c = −1, and c = KL(q‖p) + 1).
3. backward, no communication: grad_s = sw·T·(u − q·c) + hw·(softmax(s) − onehot(label)), where
   u = q·g = ∂φ/∂log q is elementwise, for the local columns only.

Collectives per call: forward_kl / reverse_kl: 1 all_gather; other divergences: 1 all_gather +
1 all_reduce; backward: none. Plus one all_gather of one int64 per rank (the shard sizes) when the
hard term is on and ``vocab_start_index`` is not given. Per row, each rank sends 4·k bytes to the
all_gather (fp32; 8·k for float64 inputs) and receives 4·k·W, with k = 4 for the soft term
(two pairs), +1 for forward/reverse KL, +3 for the hard term (+1 only when T = 1 and the soft term
is on: its pair is the student's); plus one header row of k values per call (the shard size).
The all_reduce carries 8 bytes per row (4 when no gradient is needed).

Two implementations of these passes: ``_VocabParallelKD``, chunked PyTorch (backend "reference",
and float64 inputs), and ``_VocabParallelKernelKD``, the kernels of a backend with the
"vocab_parallel" capability through the ``kdkernels::`` ops (``forward_rows`` for pass 1,
``forward_rows_given_stats`` for pass 2, ``backward_rows`` for step 3); same collectives.

Requirements: every rank of ``group`` holds the same rows (same leading shape, same labels) and
contiguous, non-overlapping shards that together cover the vocabulary in rank order (an explicit
``vocab_start_index`` is trusted, not checked). Each teacher shard must start at the same
vocabulary id as the student shard; teacher columns past the student shard's width are dropped. The loss is
replicated on every rank, and every rank must backpropagate that same loss (as in Megatron): the
gradient of each rank is the gradient of the loss w.r.t. its own shard.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import backends
from .. import divergences as D
from ..backends.reference import forward_rows_given_stats as reference_given_stats
from ..backends.reference import row_chunks
from ..checks import compute_dtype
from ..ops.dense import kd_rows, kd_rows_backward, kd_rows_given_stats
from .data_parallel import check_group

__all__ = ["vocab_parallel_rows", "shard_start", "check_vocab_parallel_args", "all_gather"]

_FKL, _RKL = D.FORWARD_KL, D.REVERSE_KL
_NEG_INF = float("-inf")


# ---- communication helpers (torch.distributed collectives only) ------------------------------

def all_gather(x: Tensor, group) -> Tensor:
    """[W, *x.shape]: x of every rank of ``group``, in rank order (one collective)."""
    W = dist.get_world_size(group)
    out = x.new_empty((W * x.numel(),))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous().reshape(-1), group=group)
    return out.view(W, *x.shape)


def check_vocab_parallel_args(process_group, vocab_start_index) -> None:
    """Checks of the vocab-parallel arguments of ``kd_loss`` (nothing to check without them; the
    backend is resolved by ``backends.choose`` with the "vocab_parallel" capability)."""
    if process_group is None:
        if vocab_start_index is not None:
            raise ValueError("vocab_start_index applies only with process_group "
                             "(the vocab-parallel loss)")
        return
    check_group(process_group)
    if vocab_start_index is not None:
        if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int):
            raise TypeError("vocab_start_index must be an int, got "
                            f"{type(vocab_start_index).__name__}")
        if vocab_start_index < 0:
            raise ValueError(f"vocab_start_index must be >= 0, got {vocab_start_index}")


# ---- per-row merges -------------------------------------------------------------------------

def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _local_lse(x: Tensor, inv_T: float = 1.0):
    """Per-row (m, z) with logsumexp(x/T) = m/T + z, m = max(x) in raw logit units: (−inf, −inf)
    for an all −inf row.

    The pair keeps log-probabilities accurate for large logits: (x − m)·(1/T) − z, the max
    subtracted before the scaling as the kernels do, loses nothing to the rounding of x/T or of
    a large logsumexp (|x| ≈ 1e4 has an fp32 ulp of 1e−3)."""
    m = x.amax(-1)
    z = ((x - torch.where(m == _NEG_INF, 0.0, m)[:, None]) * inv_T).exp().sum(-1).log()
    return m, z


def _merge_lse(m_r: Tensor, z_r: Tensor, inv_T: float = 1.0):
    """Global (M, Z) from per-rank pairs [W, N]: logsumexp over all columns of x/T = M/T + Z."""
    M = m_r.amax(0)
    Z = ((m_r - torch.where(M == _NEG_INF, 0.0, M)) * inv_T + z_r).exp().sum(0).log()
    return M, Z


def _log_prob(x: Tensor, m: Tensor, z: Tensor, inv_T: float = 1.0) -> Tensor:
    """x/T − logsumexp(x/T) = (x − m)·(1/T) − z, the (m, z) pair broadcast over the row."""
    return (x - m[:, None]) * inv_T - z[:, None]


def _merge_online(div_id, pa, pb, w_r, Ma, Za, Mb, Zb, inv_T):
    """Global forward/reverse KL from per-rank pairs and local terms [W, N] (module doc)."""
    rel_a = (pa[0] - Ma) * inv_T + (pa[1] - Za)   # A_r − A: log of the teacher mass on rank r
    rel_b = (pb[0] - Mb) * inv_T + (pb[1] - Zb)   # B_r − B
    if div_id == _FKL:
        weight, term = rel_a.exp(), w_r + rel_a - _finite_or_zero(rel_b)
    else:
        weight, term = rel_b.exp(), w_r + rel_b - _finite_or_zero(rel_a)
    # A shard with no mass contributes nothing; NaN (weight NaN) still propagates.
    return torch.where(weight == 0, 0.0, weight * term).sum(0)


def _shard_log_prob(x: Tensor, m: Tensor, z: Tensor, inv_T: float) -> Tensor:
    """Log-probabilities within the shard; an all −inf shard keeps x (−inf), never NaN."""
    empty = (m == _NEG_INF)[:, None]
    return torch.where(empty, x, _log_prob(x, torch.where(m == _NEG_INF, 0.0, m), z, inv_T))


# ---- forward / backward -----------------------------------------------------------------------

class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s3, t3, labels, group, start, div_id, param, T, sw, hw, ignore_index):
        Bsz, L, V = s3.shape
        N = Bsz * L
        cd = compute_dtype(s3.dtype)
        dev = s3.device
        need_grad = ctx.needs_input_grad[0]
        online = sw != 0.0 and div_id in (_FKL, _RKL)
        hard_own = hw != 0.0 and not (sw != 0.0 and T == 1.0)  # at T = 1 the soft b is s

        # columns of the gathered per-row stats
        cols = (["ma", "za", "mb", "zb"] if sw else []) + (["w"] if online else []) + \
               (["ms", "zs"] if hard_own else []) + (["sl"] if hw else [])
        ci = {c: i for i, c in enumerate(cols)}
        if hw and not hard_own:
            ci["ms"], ci["zs"] = ci["mb"], ci["zb"]
        k = max(len(cols), 1)
        local = torch.zeros(N + 1, k, dtype=cd, device=dev)
        local[N, 0] = V  # header row: this rank's vocabulary size

        valid = None if labels is None else labels != ignore_index
        lab_local = owned = None
        if hw:
            lab_local = labels - start
            owned = valid & (lab_local >= 0) & (lab_local < V)
            lab_local = torch.where(owned, lab_local, 0)

        # pass 1: local statistics
        for b, l0, l1, r0, r1 in row_chunks(Bsz, L, V):
            s = s3[b, l0:l1].to(cd)
            if sw:
                a = t3[b, l0:l1, :V].to(cd)   # raw logits: centred, then scaled by 1/T
                bb = s
                ma, za = _local_lse(a, 1.0 / T)
                mb, zb = _local_lse(bb, 1.0 / T)
                local[r0:r1, ci["ma"]], local[r0:r1, ci["za"]] = ma, za
                local[r0:r1, ci["mb"]], local[r0:r1, ci["zb"]] = mb, zb
                if online:
                    logp = _shard_log_prob(a, ma, za, 1.0 / T)
                    logq = _shard_log_prob(bb, mb, zb, 1.0 / T)
                    local[r0:r1, ci["w"]] = D.terms(div_id, param, logp, logq).sum(-1)
            if hard_own:
                local[r0:r1, ci["ms"]], local[r0:r1, ci["zs"]] = _local_lse(s)
            if hw:
                sl = s.gather(-1, lab_local[r0:r1, None]).squeeze(-1)
                local[r0:r1, ci["sl"]] = torch.where(owned[r0:r1], sl, 0.0)

        G = all_gather(local, group)                 # [W, N + 1, k]   (collective 1)
        vocab_size = G[:, N, 0].sum()
        G = G[:, :N]

        zero = torch.zeros(N, dtype=cd, device=dev)
        Ma = Za = Mb = Zb = Ms = Zs = c = zero
        rows = zero
        if sw:
            pa = (G[:, :, ci["ma"]], G[:, :, ci["za"]])
            pb = (G[:, :, ci["mb"]], G[:, :, ci["zb"]])
            Ma, Za = _merge_lse(*pa, 1.0 / T)
            Mb, Zb = _merge_lse(*pb, 1.0 / T)
            if online:
                Dv = _merge_online(div_id, pa, pb, G[:, :, ci["w"]], Ma, Za, Mb, Zb, 1.0 / T)
                c = torch.full_like(Dv, -1.0) if div_id == _FKL else Dv + 1.0
            else:
                # pass 2: Σφ and the partial c with the global statistics
                given = torch.stack([Ma, Za, Mb, Zb], 1)
                part = reference_given_stats(s3, t3, None, given, div_id, param, T, ignore_index)
                part = part if need_grad else part[:, :1].contiguous()
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)   # (collective 2)
                Dv = part[:, 0]
                if need_grad:
                    c = part[:, 1]
            rows = rows + (sw * T * T) * Dv
        if hw:
            Ms, Zs = _merge_lse(G[:, :, ci["ms"]], G[:, :, ci["zs"]])
            ce = (Ms - G[:, :, ci["sl"]].sum(0)) + Zs
            in_range = (labels >= 0) & (labels < vocab_size)
            rows = rows + hw * torch.where(in_range, ce, float("nan"))
        if valid is not None:
            rows = torch.where(valid, rows, 0.0)

        stats = torch.stack([Ma, Za, Mb, Zb, Ms, Zs, c], 1)
        ctx.save_for_backward(s3, t3, valid, lab_local, owned, stats)
        ctx.scalars = (div_id, param, T, sw, hw)
        ctx.mark_non_differentiable(vocab_size)
        return rows, vocab_size

    @staticmethod
    def backward(ctx, grad_rows, _grad_vocab):
        s3, t3, valid, lab_local, owned, stats = ctx.saved_tensors
        div_id, param, T, sw, hw = ctx.scalars
        Bsz, L, V = s3.shape
        grad = torch.empty_like(s3, memory_format=torch.contiguous_format)
        cd = compute_dtype(s3.dtype)
        go = grad_rows.to(cd)
        for b, l0, l1, r0, r1 in row_chunks(Bsz, L, V):
            Ma, Za, Mb, Zb, Ms, Zs, c = stats[r0:r1].unbind(1)
            s = s3[b, l0:l1].to(cd)
            g = torch.zeros_like(s)
            if sw:
                logp = _log_prob(t3[b, l0:l1, :V].to(cd), Ma, Za, 1.0 / T)
                logq = _log_prob(s, Mb, Zb, 1.0 / T)
                u = D.dphi_dlogq(div_id, param, logp, logq)
                g = (sw * T) * (u - logq.exp() * c[:, None])
            if hw:
                g = g + hw * _log_prob(s, Ms, Zs).exp()
                onehot = torch.zeros_like(g).scatter_(-1, lab_local[r0:r1, None], 1.0)
                g = g - hw * torch.where(owned[r0:r1, None], onehot, 0.0)
            g = g * go[r0:r1, None]
            if valid is not None:
                g = torch.where(valid[r0:r1, None], g, 0.0)
            grad[b, l0:l1] = g.to(grad.dtype)
        return (grad,) + (None,) * 10


# ---- the kernel path (backend "cpu", "triton", "cuda") ------------------------------------------

def _pair_from_kernel(m: Tensor, lz: Tensor) -> Tensor:
    """A kernel's (safe max, log sum-exp) of a shard as the (m, z) pair of the merges: an empty
    (all −inf) shard, which a kernel stores as (0, −inf), becomes (−inf, −inf)."""
    return torch.where(lz == _NEG_INF, _NEG_INF, m)


def _safe(m: Tensor) -> Tensor:
    """A merged maximum as the kernels' stats hold it: −inf (no mass anywhere) becomes 0."""
    return torch.where(m == _NEG_INF, 0.0, m)


class _VocabParallelKernelKD(torch.autograd.Function):
    """The vocab-parallel rows on a kernel backend (module doc; same collectives as
    ``_VocabParallelKD``). Every kernel call goes through the ``kdkernels::`` ops:

    * pass 1, ``kd_rows`` on the local shard with the soft term only (hard_weight 0): the shard's
      (max, log sum-exp) of t/T and s/T and, for forward / reverse KL, T²·(shard-local divergence);
      the two-pass divergences ask it for the statistics of forward KL (one read of the shard).
      When the hard term needs its own normaliser (T != 1 or no soft term), a second ``kd_rows``
      with only the hard term at T = 1 gives the (max, log sum-exp) of s; the label logit is
      gathered on the owning rank. Maxima are in raw logit units on every backend
      (log p = (t - m)/T - lz), and the merges scale their differences by 1/T.
    * one all_gather; the merges of the reference path;
    * pass 2 (jsd, skew_kl, skew_reverse_kl, tvd): ``kd_rows_given_stats`` with the global
      normalisers, then one all_reduce of (Σφ, partial c);
    * backward: ``kd_rows_backward`` with the global stats and a local label per row (the label
      minus this rank's offset when this rank owns it, else ``V_local`` or ``V_local + 1``, a
      column outside the shard: the kernels then add hard_weight·softmax(s) and no one-hot).
      Reverse KL on kernels that re-sum its c over the columns they see
      (``BackendSpec.resums_reverse_kl_c``) runs the identical gradient form of skew reverse KL at
      α = 0 (m = p exactly: g = log q − log p + 1) with the global c = KL(q‖p) + 1.
    """

    @staticmethod
    def forward(ctx, s3, t3, labels, group, start, div_id, param, T, sw, hw, ignore_index,
                backend):
        Bsz, L, V = s3.shape
        N = Bsz * L
        dev = s3.device
        spec = backends.BACKENDS[backend]
        inv = 1.0 / T   # the maxima are of the raw logits x: exponents (m - M) / T
        need_grad = ctx.needs_input_grad[0]
        online = sw != 0.0 and div_id in (_FKL, _RKL)
        hard_own = hw != 0.0 and not (sw != 0.0 and T == 1.0)  # at T = 1 the soft b is s

        valid = None if labels is None else labels != ignore_index
        lab_k = None  # labels for the kernels: ignore_index kept, local ids, a column outside
        lab_g = owned = None
        if labels is not None:
            lab_k = labels
            if hw:
                lab_local = labels - start
                owned = valid & (lab_local >= 0) & (lab_local < V)
                outside = V + 1 if ignore_index == V else V
                lab_k = torch.where(owned, lab_local, torch.where(valid, outside, ignore_index))
                lab_g = torch.where(owned, lab_local, 0)

        cols = (["ma", "za", "mb", "zb"] if sw else []) + (["w"] if online else []) + \
               (["ms", "zs"] if hard_own else []) + (["sl"] if hw else [])
        ci = {c: i for i, c in enumerate(cols)}
        if hw and not hard_own:
            ci["ms"], ci["zs"] = ci["mb"], ci["zb"]
        k = max(len(cols), 1)
        local = torch.zeros(N + 1, k, dtype=torch.float32, device=dev)
        local[N, 0] = V  # header row: this rank's vocabulary size

        # pass 1: local statistics (kernels)
        if sw:
            loss1, st1 = kd_rows(s3, t3, labels, backend, div_id if online else _FKL, param, T,
                                 1.0, 0.0, ignore_index)
            local[:N, ci["ma"]] = _pair_from_kernel(st1[:, 0], st1[:, 1])
            local[:N, ci["za"]] = st1[:, 1]
            local[:N, ci["mb"]] = _pair_from_kernel(st1[:, 2], st1[:, 3])
            local[:N, ci["zb"]] = st1[:, 3]
            if online:
                local[:N, ci["w"]] = loss1 / (T * T)
        if hard_own:
            _, st2 = kd_rows(s3, t3, lab_k, backend, _FKL, 0.0, 1.0, 0.0, 1.0, ignore_index)
            local[:N, ci["ms"]] = _pair_from_kernel(st2[:, 5], st2[:, 6])
            local[:N, ci["zs"]] = st2[:, 6]
        if hw:
            sl = s3.gather(-1, lab_g.view(Bsz, L, 1)).reshape(N).float()
            local[:N, ci["sl"]] = torch.where(owned, sl, 0.0)

        G = all_gather(local, group)                 # [W, N + 1, k]   (collective 1)
        vocab_size = G[:, N, 0].sum()
        G = G[:, :N]

        zero = torch.zeros(N, dtype=torch.float32, device=dev)
        Ma = Za = Mb = Zb = Ms = Zs = c = zero
        rows = zero
        if sw:
            pa = (G[:, :, ci["ma"]], G[:, :, ci["za"]])
            pb = (G[:, :, ci["mb"]], G[:, :, ci["zb"]])
            Ma, Za = _merge_lse(*pa, inv)
            Mb, Zb = _merge_lse(*pb, inv)
            if online:
                Dv = _merge_online(div_id, pa, pb, G[:, :, ci["w"]], Ma, Za, Mb, Zb, inv)
                if div_id == _FKL:
                    c = torch.full_like(Dv, -1.0)
                else:
                    c = Dv + (1.0 if spec.c_full else 0.0)
            else:
                given = torch.stack([_safe(Ma), Za, _safe(Mb), Zb, zero, zero, zero], 1)
                part = kd_rows_given_stats(s3, t3, labels, given, backend, div_id, param, T,
                                           ignore_index)
                part = part if need_grad else part[:, :1].contiguous()
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)   # (collective 2)
                Dv = part[:, 0]
                if need_grad:
                    c = part[:, 1]
            rows = rows + (sw * T * T) * Dv
        if hw:
            Ms, Zs = _merge_lse(G[:, :, ci["ms"]], G[:, :, ci["zs"]])
            ce = (Ms - G[:, :, ci["sl"]].sum(0)) + Zs
            in_range = (labels >= 0) & (labels < vocab_size)
            rows = rows + hw * torch.where(in_range, ce, float("nan"))
        if valid is not None:
            rows = torch.where(valid, rows, 0.0)

        stats = torch.stack([_safe(Ma), Za, _safe(Mb), Zb, c, _safe(Ms), Zs], 1).contiguous()
        ctx.save_for_backward(s3, t3, lab_k, stats)
        b_div, b_param = div_id, param
        if div_id == _RKL and spec.resums_reverse_kl_c:
            b_div, b_param = D.SKEW_REVERSE_KL, 0.0
        ctx.scalars = (backend, b_div, b_param, T, sw, hw, ignore_index)
        ctx.mark_non_differentiable(vocab_size)
        return rows, vocab_size

    @staticmethod
    def backward(ctx, grad_rows, _grad_vocab):
        s3, t3, lab_k, stats = ctx.saved_tensors
        grad = kd_rows_backward(grad_rows.float().contiguous(), s3, t3, lab_k, stats,
                                *ctx.scalars)
        return (grad,) + (None,) * 11


def shard_start(local_vocab: int, group, device) -> Tensor:
    """This rank's first global vocabulary id when the shards lie in rank order: the sum of the
    lower ranks' shard sizes (one all_gather of one int64 per rank; a 0-dim int64 tensor)."""
    sizes = all_gather(torch.tensor([local_vocab], dtype=torch.int64, device=device),
                        group).view(-1)
    return sizes[:dist.get_rank(group)].sum()


def vocab_parallel_rows(s3: Tensor, t3: Tensor, labels: Optional[Tensor], group,
                        vocab_start_index, div_id: int, param: float, temperature: float,
                        soft_weight: float, hard_weight: float, ignore_index: int,
                        backend: str = "reference"):
    """Per-row losses [N] of the full vocabulary from the local shards, and the global vocabulary
    size (a 0-dim tensor), for validated arguments (``kd_loss`` calls this).

    ``s3``/``t3`` are [B, L, V_local] / [B, L, >= V_local] row views (see ``functional.as_rows``),
    ``labels`` None or int64 [N] global vocabulary ids. ``backend``: a resolved backend name
    ("reference": the chunked PyTorch path; a kernel backend with the "vocab_parallel"
    capability: its kernels on the shard, through the ``kdkernels::`` ops).
    """
    start = vocab_start_index
    if hard_weight != 0.0 and start is None:
        start = shard_start(s3.shape[-1], group, s3.device)
    args = (s3, t3, labels, group, start, div_id, param, temperature, soft_weight, hard_weight,
            ignore_index)
    if backend == "reference":
        rows, vocab_size = _VocabParallelKD.apply(*args)
    else:
        rows, vocab_size = _VocabParallelKernelKD.apply(*args, backend)
    if labels is not None and labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, {int(vocab_size)}) (the global vocabulary) "
                             f"or equal ignore_index={ignore_index}; found {int(labels[i])} at "
                             f"flat position {i}")
    return rows, vocab_size
