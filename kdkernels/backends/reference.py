"""Pure-PyTorch reference backend: readable, any device, fp32 math (float64 for float64 inputs).

It is the fallback, the oracle the kernels are tested against, and the one backend with every
feature (ensembles, teacher gradients, logit_mse; the sparse student statistics at the end). ``row_losses`` is the
formula of DESIGN.md §2 on a block of rows, written with plain tensor ops so autograd gives the
gradients of §3, in the kernels' numerical forms (``divergences.log_softmax_centred``: the row
max subtracted before the scaling by 1/T; ``divergences.log_mix``: the mixture as
hi + log(w_hi + w_lo·e^(lo − hi))), so identical rows give exactly 0 here too. ``loss_rows`` applies it over chunks of rows under activation checkpointing, so
the reference never holds more than a few [chunk, V] fp32 buffers at a time and needs no
hand-written backward.
The per-element math and its zero-probability conventions are in ``kdkernels.divergences``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .. import divergences as D
from ..checks import compute_dtype

_NEG_INF = float("-inf")
# Elements of fp32 work per chunk of rows (~4 MB per [chunk, V] fp32 buffer).
CHUNK_ELEMENTS = 1 << 20


def teacher_log_probs(teachers, weights, temperature: float) -> torch.Tensor:
    """log p for one teacher [R, V] (weights None) or an ensemble: log Σ_m w_m softmax(t_m / T),
    accumulated teacher by teacher (never more than two [R, V] terms at a time)."""
    inv_T = 1.0 / temperature
    if isinstance(teachers, torch.Tensor):
        return D.log_softmax_centred(teachers, inv_T)
    acc = None
    for w, t in zip(weights, teachers):
        if w == 0.0:
            continue  # a zero-weight teacher adds nothing (and gets a zero gradient)
        x = D.log_softmax_centred(t, inv_T) + math.log(w)
        acc = x if acc is None else D.logaddexp(acc, x)
    return acc


def logit_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row (1/2V) Σ (t̃ − s̃)² on row-centred logits. Columns where both are −inf are left
    out (V counts the others); −inf in only one of them gives inf or NaN."""
    keep = ~((s == _NEG_INF) & (t == _NEG_INF))
    n = keep.sum(-1, keepdim=True).clamp_min(1).to(s.dtype)
    d = torch.where(keep, t, 0.0) - torch.where(keep, s, 0.0)
    d = torch.where(keep, d - d.sum(-1, keepdim=True) / n, 0.0)  # centred t − s = t̃ − s̃
    return d.square().sum(-1) / (2.0 * n.squeeze(-1))


class _NanRowsUnlessFinite(torch.autograd.Function):
    """Identity on a [R, V] block; in backward a row of the gradient with any non-finite element
    becomes NaN in every element: the +inf-loss gradient rule the kernels follow
    (docs/precision.md). Autograd alone would leave that row mixed: +-inf where the infinite term
    is subtracted, NaN where it meets itself (infinity minus infinity)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.where(torch.isfinite(g).all(-1, keepdim=True), g, float("nan"))


def _with_gradient_rule(x: torch.Tensor) -> torch.Tensor:
    return _NanRowsUnlessFinite.apply(x) if x.requires_grad else x


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
    s = _with_gradient_rule(student.to(cd))
    if isinstance(teacher, torch.Tensor):
        t = _with_gradient_rule(teacher[..., :V].to(cd))
    else:
        if teacher_weights is None:
            teacher_weights = [1.0 / len(teacher)] * len(teacher)
        t = [_with_gradient_rule(x[..., :V].to(cd)) for x in teacher]
    loss = torch.zeros(s.shape[:-1], dtype=cd, device=s.device)
    if soft_weight != 0.0:
        if div_id == D.LOGIT_MSE:  # no temperature, no T² (see divergences.py)
            if not isinstance(t, torch.Tensor):
                t = sum(w * x for w, x in zip(teacher_weights, t) if w != 0.0)
            loss = loss + soft_weight * logit_mse(s, t)
        else:
            logp = teacher_log_probs(t, teacher_weights, temperature)
            logq = D.log_softmax_centred(s, 1.0 / temperature)  # the kernels' centring
            div = D.terms(div_id, param, logp, logq).sum(-1)
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


def row_chunks(B: int, L: int, V: int):
    """Yield (b, l0, l1, r0, r1): chunks [b, l0:l1] of rows of a [B, L, V] view, about
    CHUNK_ELEMENTS elements each, and their flat row range [r0, r1)."""
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            yield b, l0, l1, b * L + l0, b * L + l1


def forward_rows_given_stats(student: torch.Tensor, teacher: torch.Tensor,
                             labels: Optional[torch.Tensor], stats: torch.Tensor, div_id: int,
                             param: float, temperature: float, ignore_index: int) -> torch.Tensor:
    """[N, 2] (fp32; float64 for float64 inputs): per row Σφ and Σ q·g (g = ∂φ/∂q, in full) over
    the columns of ``student`` [B, L, V] / ``teacher`` [B, L, >= V], with log p = (t − m_a)/T − z_a
    and log q = (s − m_b)/T − z_b from the normalisers in ``stats`` columns 0..3 (m in raw logit
    units, the maximum subtracted before the scaling); 0 on ignored rows. The vocab-parallel pass
    with the global statistics (``kdkernels.distributed.vocab_parallel``), in chunks of rows."""
    Bn, L, V = student.shape
    cd = compute_dtype(student.dtype)
    out = torch.zeros(Bn * L, 2, dtype=cd, device=student.device)
    inv_T = 1.0 / temperature
    for b, l0, l1, r0, r1 in row_chunks(Bn, L, V):
        ma, za, mb, zb = stats[r0:r1, :4].to(cd).unbind(1)
        logp = (teacher[b, l0:l1, :V].to(cd) - ma[:, None]) * inv_T - za[:, None]
        logq = (student[b, l0:l1].to(cd) - mb[:, None]) * inv_T - zb[:, None]
        out[r0:r1, 0] = D.terms(div_id, param, logp, logq).sum(-1)
        out[r0:r1, 1] = D.dphi_dlogq(div_id, param, logp, logq).sum(-1)
    if labels is not None:
        out = torch.where((labels == ignore_index)[:, None], 0.0, out)
    return out


# ---- the reference backend ------------------------------------------------------------------

def masked_row_losses(student, teachers, labels, args, weights, mask_teachers=False):
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
        for b, l0, l1, _, _ in row_chunks(B, L, V):
            lab = None if labels is None else labels[b * L + l0:b * L + l1]
            out[b * L + l0:b * L + l1] = masked_row_losses(
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
        for b, l0, l1, _, _ in row_chunks(B, L, V):
            r0, r1 = b * L + l0, b * L + l1
            lab = None if labels is None else labels[r0:r1]
            with torch.enable_grad():
                s = student[b, l0:l1].detach().requires_grad_(want_s)
                ts = tuple(t[b, l0:l1].detach().requires_grad_(w) for t, w in zip(teachers, want_t))
                leaves = ([s] if want_s else []) + [t for t, w in zip(ts, want_t) if w]
                loss = masked_row_losses(s, ts, lab, ctx.args, ctx.weights,
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
    for b, l0, l1, _, _ in row_chunks(B, L, V):
        lab = None if labels is None else labels[b * L + l0:b * L + l1]
        pieces.append(checkpoint(masked_row_losses, student[b, l0:l1],
                                 tuple(t[b, l0:l1] for t in teachers), lab, args, weights,
                                 mask_teachers, use_reentrant=False))
    if not pieces:
        return student.new_zeros((B * L,), dtype=compute_dtype(student.dtype))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)




@contextlib.contextmanager
def _autograd_in_op_body():
    """Turn autograd back on inside a custom-op body (where the fused linear op calls
    ``rows_with_grad``). Custom-op implementations run below the autograd dispatch key (and, in
    compiled graphs, below functorch too), so ``torch.autograd.grad`` would record nothing there.
    This lifts the exclusion of the autograd keys for the duration of the block and enables grad
    mode. (The one use of a private torch API in the package: the reference has no hand-written
    gradient to call instead.)"""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(K.AutogradFunctionality).remove(K.ADInplaceOrView)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def rows_with_grad(s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                   grad_rows: Optional[torch.Tensor], args: tuple):
    """Per-row losses of one [c, V] chunk and, when ``grad_rows`` is given, the gradient of
    Σ grad_rows[i]·loss[i] w.r.t. ``s``; callable inside a custom-op body. The chunk already
    bounds memory, so the formula runs on it directly (no second level of chunks)."""
    if grad_rows is None:
        return masked_row_losses(s, (t,), labels, args, None), None
    with _autograd_in_op_body():
        leaf = s.detach().requires_grad_(True)
        rows = masked_row_losses(leaf, (t,), labels, args, None)
        (g,) = torch.autograd.grad(rows, leaf, grad_rows.to(rows.dtype).expand_as(rows))
    return rows.detach(), g


# ---- the student side of sparse_kd_loss (the "sparse" capability) --------------------------

def sparse_stats(s3: torch.Tensor, idx: torch.Tensor, labels: Optional[torch.Tensor], T: float,
                 need_b: bool, need_a: bool):
    """-> stats [N, 3] (lse(s/T), lse(s), s[label]; 0 where not needed), gathered s[idx] [N, K]."""
    Bd, L, V = s3.shape
    cd = compute_dtype(s3.dtype)
    K = idx.shape[1]
    stats = torch.zeros((Bd * L, 3), dtype=cd, device=s3.device)
    gathered = torch.zeros((Bd * L, K), dtype=cd, device=s3.device)
    gidx = idx.clamp_min(0)
    lab = None
    if need_a:
        lab = torch.where((labels >= 0) & (labels < V), labels, 0).unsqueeze(1)
    for b, l0, l1, r0, r1 in row_chunks(Bd, L, V):
        x = s3[b, l0:l1]
        gathered[r0:r1] = x.gather(1, gidx[r0:r1]).to(cd)
        if need_b or need_a:
            x = x.to(cd)
            if need_b:
                stats[r0:r1, 0] = torch.logsumexp(x * (1.0 / T), dim=1)
            if need_a:
                stats[r0:r1, 1] = torch.logsumexp(x, dim=1)
                stats[r0:r1, 2] = x.gather(1, lab[r0:r1]).squeeze(1)
    return stats, gathered


def sparse_grad(s3: torch.Tensor, stats: torch.Tensor, idx: torch.Tensor,
                labels: Optional[torch.Tensor], T: float, need_b: bool, need_a: bool,
                c_b: torch.Tensor, c_a: torch.Tensor, g_idx: torch.Tensor,
                g_lab: torch.Tensor) -> torch.Tensor:
    """-> grad [B, L, V]: c_b·softmax(s/T) + c_a·softmax(s) + g_idx at idx + g_lab at label."""
    Bd, L, V = s3.shape
    cd = compute_dtype(s3.dtype)
    grad = torch.empty((Bd, L, V), dtype=s3.dtype, device=s3.device)
    gidx = idx.clamp_min(0)
    g_idx = torch.where(idx >= 0, g_idx, 0.0)
    if need_a:
        in_range = (labels >= 0) & (labels < V)
        lab = torch.where(in_range, labels, 0).unsqueeze(1)
        g_lab = torch.where(in_range, g_lab, 0.0).unsqueeze(1)
    for b, l0, l1, r0, r1 in row_chunks(Bd, L, V):
        x = s3[b, l0:l1].to(cd)
        g = torch.zeros_like(x)
        if need_b:  # c_B · softmax(s/T); rows with c_B = 0 (ignored rows) stay exactly 0
            c = c_b[r0:r1].unsqueeze(1)
            g += torch.where(c != 0, c * torch.exp(x * (1.0 / T) - stats[r0:r1, 0:1]), 0.0)
        if need_a:
            c = c_a[r0:r1].unsqueeze(1)
            g += torch.where(c != 0, c * torch.exp(x - stats[r0:r1, 1:2]), 0.0)
            g.scatter_add_(1, lab[r0:r1], g_lab[r0:r1])
        g.scatter_add_(1, gidx[r0:r1], g_idx[r0:r1])
        grad[b, l0:l1] = g
    return grad
