"""Fused linear KD: the loss from hidden states and lm_head weights, logits never held in full.

For each chunk of ``c`` tokens this module computes the teacher logits (no gradient) and the
student logits, hands both to a per-row backend (the kernel contract of ``backends.py``) for the
per-row loss and the logits-gradient, and turns that gradient into the hidden, weight and bias
gradients at once (``grad_h[chunk] = g @ W``, ``grad_W += gᵀ @ h``). The chunk's logits are then
dropped, so memory is O(c·V) for the logits plus the gradients of the inputs, instead of O(N·V).

Because every reduction except "none" is a fixed multiple of the sum of the rows, the weight of
each row is known before the loss is computed: forward produces the gradients of the reduced loss
and backward only scales them by the incoming scalar gradient. With ``reduction="none"`` forward
computes only the rows, and backward recomputes the logits chunk by chunk with the incoming
per-row gradients.

Layers: ``_run`` (the chunk loop) ← custom ops ``kdkernels::fused_linear_kd`` (scalar loss with
gradients formed in forward), ``kdkernels::fused_linear_kd_rows`` / ``..._rows_backward``
(per-row losses) with fake kernels and autograd ← ``fused_linear_kd_loss`` (checks, reduction).

Vocab-parallel (``process_group=``): every rank holds a vocabulary shard of the student and
teacher weights and the same (replicated) hidden states. The same ``_run`` loop runs on the local
shard with ``_ShardRows`` in place of a backend: each chunk's per-row losses and local
logits-gradient come from ``distributed.vocab_parallel_rows`` (its collectives, forward only)
and ``torch.autograd.grad`` (its backward has no collective). ``grad_weight`` and ``grad_bias``
are local; the hidden gradient Σ_ranks g_local @ W_local is summed by ONE all_reduce over the
whole [N, Ds] buffer after the loop (``_VocabParallelFusedKD``, an autograd.Function).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import backends
from . import distributed
from . import divergences as D
from . import reference
from .functional import REDUCTIONS, _check_labels, _check_number, check_options

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss", "auto_chunk_size"]

# Backend resolution imports modules and probes the machine: under torch.compile it runs once at
# trace time and its answer (a str) is a constant of the graph.
_choose_backend = torch.compiler.assume_constant_result(backends.choose)

# Default chunk size: bytes of ONE fp32 [chunk, V] buffer, per device type. A chunk holds a few
# such buffers at its peak (teacher and student logits, the logits-gradient, the backend's
# temporaries; about a dozen for the autograd-based reference backend). On CPU, 16 MiB keeps
# every buffer under glibc's mmap threshold (32 MiB), so chunk buffers are reused from the heap
# instead of being freshly mapped and first-touched for every chunk.
CHUNK_BUFFER_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}
# Never fewer rows than this per chunk (when N has them), so the GEMMs stay efficient.
MIN_CHUNK_ROWS = {"cuda": 1024, "cpu": 128}


def auto_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: as many as keep one fp32 [chunk, V] buffer within CHUNK_BUFFER_BYTES, at
    least the per-device minimum that keeps the GEMMs efficient, at most ``n_rows``."""
    kind = device.type if device.type in CHUNK_BUFFER_BYTES else "cpu"
    rows = CHUNK_BUFFER_BYTES[kind] // (4 * max(vocab, 1))
    rows = max(rows, MIN_CHUNK_ROWS[kind])
    return max(1, min(rows, n_rows))


# ---- the chunk loop ----------------------------------------------------------------------------

def _logits(h: Tensor, w: Tensor, b: Optional[Tensor], softcap: float):
    """``h @ wᵀ + b``, soft-capped when ``softcap`` > 0. Returns (logits, tanh or None); the tanh
    (fp32, float64 for float64) is what the soft-cap gradient needs."""
    z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    if softcap <= 0.0:
        return z, None
    th = torch.tanh(z.to(reference.compute_dtype(z.dtype)) / softcap)
    return (softcap * th).to(z.dtype), th


@contextlib.contextmanager
def _autograd_in_op_body():
    """Turn autograd back on inside a custom-op body, for the reference backend only.

    Custom-op implementations run below the autograd dispatch key (and, in compiled graphs,
    below functorch too), so ``torch.autograd.grad`` would record nothing there. This lifts the
    exclusion of the autograd keys for the duration of the block and enables grad mode.
    """
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(K.AutogradFunctionality).remove(K.ADInplaceOrView)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _rows_and_grad(s: Tensor, t: Tensor, labels: Optional[Tensor], grad_rows: Optional[Tensor],
                   backend, args: tuple) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row losses of a [c, V] chunk and, when ``grad_rows`` is given, the gradient of
    Σ grad_rows[i]·loss[i] w.r.t. ``s`` (student dtype). ``backend``: a backend name, or a
    ``_ShardRows`` (vocab-parallel shards)."""
    if isinstance(backend, _ShardRows):
        return backend(s, t, labels, grad_rows, args)
    if backend == "reference":
        # The chunk already bounds memory, so the reference formula runs on it directly (no
        # second level of checkpointed chunks), with autograd for the gradient.
        if grad_rows is None:
            return reference._masked_row_losses(s, (t,), labels, args, None), None
        with _autograd_in_op_body():
            leaf = s.detach().requires_grad_(True)
            rows = reference._masked_row_losses(leaf, (t,), labels, args, None)
            (g,) = torch.autograd.grad(rows, leaf, grad_rows.to(rows.dtype).expand_as(rows))
        return rows.detach(), g
    s3, t3 = s.unsqueeze(0), t.unsqueeze(0)
    mod = backends.load(backend)
    rows, stats = mod.forward_rows(s3, t3, labels, *args)
    if grad_rows is None:
        return rows, None
    g = mod.backward_rows(grad_rows.to(torch.float32).contiguous(), s3, t3, labels, stats, *args)
    return rows, g[0]


class _ShardRows:
    """The per-chunk rows of a vocabulary shard: ``distributed.vocab_parallel_rows`` (the
    collectives of the statistics, in forward only) and, for the gradient, autograd through it
    (its backward is local). Remembers the global vocabulary size it returns."""

    def __init__(self, group, start):
        self.group, self.start, self.vocab_size = group, start, None

    def __call__(self, s, t, labels, grad_rows, args):
        if grad_rows is None:
            with torch.no_grad():
                rows, self.vocab_size = distributed.vocab_parallel_rows(
                    s.unsqueeze(0), t.unsqueeze(0), labels, self.group, self.start, *args)
            return rows, None
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            rows, self.vocab_size = distributed.vocab_parallel_rows(
                leaf.unsqueeze(0), t.unsqueeze(0), labels, self.group, self.start, *args)
            (g,) = torch.autograd.grad(rows, leaf, grad_rows.to(rows.dtype).expand_as(rows))
        return rows.detach(), g


def _accumulate_weight_grad(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """acc += gᵀ @ h, accumulated in acc's dtype."""
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), h)
        return
    if acc.device.type == "cuda":
        try:  # half inputs, fp32 GEMM output (torch >= 2.9 on CUDA)
            acc.add_(torch.mm(g.t(), h, out_dtype=acc.dtype))
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(g.t().to(acc.dtype), h.to(acc.dtype))


def _run(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
         bt: Optional[Tensor], labels: Optional[Tensor], grad_rows: Optional[Tensor], backend: str,
         div_id: int, param: float, temperature: float, soft_weight: float, hard_weight: float,
         ignore_index: int, softcap: float, chunk_size: int, weight_grad_fp32: bool,
         need_hidden: bool, need_weight: bool, need_bias: bool):
    """The chunked loop. ``hs`` [N, Ds], ``ws`` [V, Ds], ``ht`` [N, Dt], ``wt`` [Vt >= V, Dt].

    ``grad_rows`` (broadcastable to [N]) weights the rows for the gradients; None computes the
    losses only. Returns (rows [N], grad_hidden, grad_weight, grad_bias), the gradients of
    Σ grad_rows[i]·rows[i] (empty [0] tensors where not asked for).
    """
    N, V = hs.shape[0], ws.shape[0]
    args = (div_id, param, temperature, soft_weight, hard_weight, ignore_index)
    rows = torch.empty(N, dtype=reference.compute_dtype(hs.dtype), device=hs.device)
    want = grad_rows is not None and (need_hidden or need_weight or need_bias)
    acc_dtype = torch.float32 if weight_grad_fp32 and ws.dtype != torch.float64 else ws.dtype
    # gradients not asked for are distinct empty tensors (op outputs may not alias)
    gh = torch.empty_like(hs) if want and need_hidden else hs.new_empty(0)
    gw = (torch.zeros(ws.shape, dtype=acc_dtype, device=ws.device) if want and need_weight
          else ws.new_empty(0))
    gb = torch.zeros(V, dtype=acc_dtype, device=ws.device) if want and need_bias else ws.new_empty(0)
    if want:
        grad_rows = grad_rows.expand(N)
    wt_v = wt[:V]  # the teacher's padded columns are never computed
    bt_v = None if bt is None else bt[:V]
    for i0 in range(0, N, chunk_size):
        i1 = min(N, i0 + chunk_size)
        lab = None if labels is None else labels[i0:i1]
        with torch.no_grad():
            t, _ = _logits(ht[i0:i1], wt_v, bt_v, softcap)
            t = t.to(hs.dtype)
            h = hs[i0:i1]
            s, th = _logits(h, ws, bs, softcap)
        r, g = _rows_and_grad(s, t, lab, grad_rows[i0:i1] if want else None, backend, args)
        rows[i0:i1] = r
        del t, s
        if g is None:
            continue
        if th is not None:  # d(cap·tanh(z/cap))/dz = 1 − tanh²
            g = (g.to(th.dtype) * (1.0 - th * th)).to(hs.dtype)
        del th
        if need_hidden:
            torch.mm(g, ws, out=gh[i0:i1])
        if need_weight:
            if lab is not None:  # g is 0 on ignored rows; keep their (maybe non-finite) h out
                h = torch.where((lab != ignore_index).unsqueeze(-1), h, 0.0)
            _accumulate_weight_grad(gw, g, h)
        if need_bias:
            gb += g.sum(0, dtype=acc_dtype)
        del g
    return rows, gh, gw, gb


# ---- custom ops ---------------------------------------------------------------------------------

def _fake_grads(hs, ws, bs, weight_grad_fp32, need_hidden, need_weight, need_bias):
    acc = torch.float32 if weight_grad_fp32 and ws.dtype != torch.float64 else ws.dtype
    return (torch.empty_like(hs) if need_hidden else hs.new_empty(0),
            ws.new_empty(ws.shape, dtype=acc) if need_weight else ws.new_empty(0),
            ws.new_empty(ws.shape[:1], dtype=acc) if need_bias else ws.new_empty(0))


@torch.library.custom_op("kdkernels::fused_linear_kd", mutates_args=())
def fused_linear_kd(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
                    bt: Optional[Tensor], labels: Optional[Tensor], scale: Tensor, backend: str,
                    div_id: int, param: float, temperature: float, soft_weight: float,
                    hard_weight: float, ignore_index: int, softcap: float, chunk_size: int,
                    weight_grad_fp32: bool, need_hidden: bool, need_weight: bool,
                    need_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss = scale·Σ rows (0-dim), and its gradients w.r.t. hs, ws, bs, formed in forward."""
    rows, gh, gw, gb = _run(hs, ws, bs, ht, wt, bt, labels, scale, backend, div_id, param,
                            temperature, soft_weight, hard_weight, ignore_index, softcap,
                            chunk_size, weight_grad_fp32, need_hidden, need_weight, need_bias)
    return (rows.sum() * scale.to(rows.dtype)), gh, gw, gb


@fused_linear_kd.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, scale, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index, softcap, chunk_size, weight_grad_fp32, need_hidden, need_weight,
      need_bias):
    loss = hs.new_empty((), dtype=reference.compute_dtype(hs.dtype))
    return (loss,) + _fake_grads(hs, ws, bs, weight_grad_fp32, need_hidden, need_weight, need_bias)


def _scaled_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[2] is not None
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.computed = inputs[-3:]  # need_hidden, need_weight, need_bias: which grads were formed
    ctx.mark_non_differentiable(*output[1:])


def _scaled_backward(ctx, grad_loss, *_):
    gh, gw, gb = ctx.saved_tensors
    hd, wd = ctx.dtypes
    ch, cw, cb = ctx.computed
    out = [None] * 21
    if ctx.needs_input_grad[0] and ch:
        out[0] = (gh * grad_loss.to(gh.dtype)).to(hd)
    if ctx.needs_input_grad[1] and cw:
        out[1] = (gw * grad_loss.to(gw.dtype)).to(wd)
    if ctx.has_bias and ctx.needs_input_grad[2] and cb:
        out[2] = (gb * grad_loss.to(gb.dtype)).to(wd)
    return tuple(out)


torch.library.register_autograd("kdkernels::fused_linear_kd", _scaled_backward,
                                setup_context=_scaled_setup)


@torch.library.custom_op("kdkernels::fused_linear_kd_rows", mutates_args=())
def fused_linear_kd_rows(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
                         bt: Optional[Tensor], labels: Optional[Tensor], backend: str, div_id: int,
                         param: float, temperature: float, soft_weight: float, hard_weight: float,
                         ignore_index: int, softcap: float, chunk_size: int,
                         weight_grad_fp32: bool) -> Tensor:
    """Per-row losses [N]; backward recomputes the logits chunk by chunk."""
    return _run(hs, ws, bs, ht, wt, bt, labels, None, backend, div_id, param, temperature,
                soft_weight, hard_weight, ignore_index, softcap, chunk_size, weight_grad_fp32,
                False, False, False)[0]


@fused_linear_kd_rows.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, *scalars):
    return hs.new_empty(hs.shape[:1], dtype=reference.compute_dtype(hs.dtype))


@torch.library.custom_op("kdkernels::fused_linear_kd_rows_backward", mutates_args=())
def fused_linear_kd_rows_backward(grad_rows: Tensor, hs: Tensor, ws: Tensor, bs: Optional[Tensor],
                                  ht: Tensor, wt: Tensor, bt: Optional[Tensor],
                                  labels: Optional[Tensor], backend: str, div_id: int,
                                  param: float, temperature: float, soft_weight: float,
                                  hard_weight: float, ignore_index: int, softcap: float,
                                  chunk_size: int, weight_grad_fp32: bool, need_hidden: bool,
                                  need_weight: bool, need_bias: bool
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    _, gh, gw, gb = _run(hs, ws, bs, ht, wt, bt, labels, grad_rows, backend, div_id, param,
                         temperature, soft_weight, hard_weight, ignore_index, softcap, chunk_size,
                         weight_grad_fp32, need_hidden, need_weight, need_bias)
    return gh, gw, gb


@fused_linear_kd_rows_backward.register_fake
def _(grad_rows, hs, ws, bs, ht, wt, bt, labels, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index, softcap, chunk_size, weight_grad_fp32, need_hidden, need_weight,
      need_bias):
    return _fake_grads(hs, ws, bs, weight_grad_fp32, need_hidden, need_weight, need_bias)


def _rows_setup(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, labels, *scalars = inputs
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels)
    ctx.scalars = scalars


def _rows_backward(ctx, grad_rows):
    hs, ws, bs, ht, wt, bt, labels = ctx.saved_tensors
    need = ctx.needs_input_grad
    nh, nw, nb = need[0], need[1], bs is not None and need[2]
    out = [None] * 17
    if not (nh or nw or nb):
        return tuple(out)
    gh, gw, gb = fused_linear_kd_rows_backward(grad_rows, hs, ws, bs, ht, wt, bt, labels,
                                               *ctx.scalars, nh, nw, nb)
    out[0] = gh if nh else None
    out[1] = gw.to(ws.dtype) if nw else None
    out[2] = gb.to(ws.dtype) if nb else None
    return tuple(out)


torch.library.register_autograd("kdkernels::fused_linear_kd_rows", _rows_backward,
                                setup_context=_rows_setup)


# ---- vocab-parallel (sharded lm_head) ----------------------------------------------------------

class _VocabParallelFusedKD(torch.autograd.Function):
    """The fused loss on vocabulary shards. ``per_row`` False: returns the scalar
    scale·Σ rows (/ V_global for "mean"), its gradients formed in forward; True: returns the rows
    [N], and backward recomputes the chunks with the incoming per-row gradients (which must be
    the same on every rank, as the rows are). Collectives: those of ``vocab_parallel_rows`` per
    chunk, plus one all_reduce SUM of the hidden gradient per gradient computation."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, scale, group, start, per_row, mean, args,
                want):
        nh, nw, nb = want  # which gradients (grad mode is off in here: the caller decides)
        ctx.set_materialize_grads(False)
        ctx.per_row, ctx.need = per_row, (nh, nw, nb)
        if per_row:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels)
            ctx.group, ctx.start, ctx.args = group, start, args
            return _run(hs, ws, bs, ht, wt, bt, labels, None, _ShardRows(group, start), *args,
                        False, False, False)[0]
        rows, gh, gw, gb, vocab_size = _vocab_parallel_run(
            hs, ws, bs, ht, wt, bt, labels, scale, group, start, args, nh, nw, nb)
        loss = rows.sum() * scale.to(rows.dtype)
        if mean and vocab_size is not None:  # "mean": divide by the GLOBAL vocabulary size
            inv = 1.0 / vocab_size.to(rows.dtype)
            loss = loss * inv
            for g in (gh, gw, gb):
                if g.numel():
                    g.mul_(inv.to(g.dtype))
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (hs.dtype, ws.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        nh, nw, nb = ctx.need
        out = [None] * 14
        if grad_out is None or not (nh or nw or nb):
            return tuple(out)
        if ctx.per_row:  # recompute the chunks with the per-row gradients
            hs, ws, bs, ht, wt, bt, labels = ctx.saved_tensors
            _, gh, gw, gb, _ = _vocab_parallel_run(hs, ws, bs, ht, wt, bt, labels, grad_out,
                                                   ctx.group, ctx.start, ctx.args, nh, nw, nb)
            out[:3] = [gh if nh else None, gw.to(ws.dtype) if nw else None,
                       gb.to(ws.dtype) if nb else None]
            return tuple(out)
        gh, gw, gb = ctx.saved_tensors
        hd, wd = ctx.dtypes
        if nh:
            out[0] = (gh * grad_out.to(gh.dtype)).to(hd)
        if nw:
            out[1] = (gw * grad_out.to(gw.dtype)).to(wd)
        if nb:
            out[2] = (gb * grad_out.to(gb.dtype)).to(wd)
        return tuple(out)


def _vocab_parallel_run(hs, ws, bs, ht, wt, bt, labels, grad_rows, group, start, args, nh, nw, nb):
    """``_run`` on the local shard, then the hidden gradient summed over the group (one
    all_reduce over the whole buffer, issued by every rank even for an empty batch).
    Returns (rows, grad_hidden, grad_weight, grad_bias, global vocabulary size or None)."""
    shard = _ShardRows(group, start)
    rows, gh, gw, gb = _run(hs, ws, bs, ht, wt, bt, labels, grad_rows, shard, *args, nh, nw, nb)
    if nh:
        torch.distributed.all_reduce(gh, op=torch.distributed.ReduceOp.SUM, group=group)
    return rows, gh, gw, gb, shard.vocab_size


# ---- public API ---------------------------------------------------------------------------------

def _check_tensor(name: str, x, dim: Optional[int] = None, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(x.shape)}")


def _check_linear(prefix: str, h, w, b) -> None:
    _check_tensor(f"{prefix}_hidden", h)
    _check_tensor(f"{prefix}_weight", w, dim=2)
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
        _check_tensor(f"{prefix}_bias", b, dim=1)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{prefix}_bias must have shape ({w.shape[0]},), got "
                             f"{tuple(b.shape)}")
        if b.dtype != w.dtype or b.device != w.device:
            raise TypeError(f"{prefix}_bias must match {prefix}_weight in dtype and device, got "
                            f"{b.dtype} on {b.device}")


def _row_scale(reduction: str, n_rows: int, V: int, flat_labels: Optional[Tensor],
               ignore_index: int, num_items_in_batch, dtype, device) -> Tensor:
    """The factor k with reduced loss = k · Σ rows (ignored rows are 0) for the reductions of
    ``functional.reduce_rows`` other than "none"; a tensor, so no host synchronisation."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if num_items_in_batch is not None:
        denom = (num_items_in_batch.to(device=device, dtype=dtype).reshape(())
                 if isinstance(num_items_in_batch, Tensor)
                 else torch.tensor(float(num_items_in_batch), dtype=dtype, device=device))
    elif flat_labels is None:
        denom = torch.tensor(float(max(n_rows, 1)), dtype=dtype, device=device)
    else:
        denom = (flat_labels != ignore_index).sum().clamp_min(1).to(dtype)
    k = 1.0 / denom
    return k / V if reduction == "mean" else k


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                         teacher_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                         divergence: str = "forward_kl", temperature: float = 1.0,
                         ignore_index: int = -100, soft_weight: float = 1.0,
                         hard_weight: float = 0.0, reduction: str = "batchmean",
                         num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
                         beta: Optional[float] = None, alpha: Optional[float] = None,
                         backend: str = "auto", softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None,
                         grad_weight_dtype: Optional[torch.dtype] = torch.float32,
                         process_group=None, vocab_start_index: Optional[int] = None) -> Tensor:
    """``kd_loss(student_hidden @ student_weightᵀ + student_bias, teacher_hidden @ teacher_weightᵀ
    + teacher_bias, ...)`` without ever holding the [N, V] logits: tokens are processed in chunks
    and the gradients w.r.t. the student hidden states, weight and bias are formed chunk by chunk.

    Args:
        student_hidden: [..., Ds] float tensor (fp32, bf16, fp16; float64 with the reference).
        student_weight: [V, Ds], same dtype and device; student_bias: optional [V].
        teacher_hidden: [..., Dt] with the same leading shape; teacher_weight: [Vt, Dt] with
            Vt >= V (only its first V rows are used: a padded teacher vocabulary costs nothing);
            teacher_bias: optional [Vt]. The teacher gets no gradient; its logits are cast to the
            student's dtype.
        labels, divergence, temperature, ignore_index, soft_weight, hard_weight, reduction,
        num_items_in_batch, beta, alpha, backend: as in ``kdkernels.kd_loss``.
        softcap: cap > 0 applies cap·tanh(z/cap) to student and teacher logits (after the bias),
            as Gemma 2 does; the gradient flows through the student side.
        chunk_size: rows per chunk; default ``auto_chunk_size`` (one fp32 [chunk, V] buffer
            within CHUNK_BUFFER_BYTES, at least MIN_CHUNK_ROWS rows).
        grad_weight_dtype: dtype in which the weight and bias gradients accumulate across chunks:
            torch.float32 (default) or None / the weight's dtype to save memory.
        process_group: a ``torch.distributed`` tensor-parallel group over which the lm_heads are
            sharded by vocabulary: ``student_weight`` (and bias) is this rank's [V_local, Ds]
            shard, ``teacher_weight`` (and bias) the [>= V_local, Dt] shard starting at the same
            vocabulary id; the hidden states and labels (global ids) are the same on every rank.
            Returns the full-vocabulary loss on every rank; the weight and bias gradients are
            those of the local shard, the hidden gradient is the full one (summed over the
            group). ``backend`` must be "auto" or "reference". See docs/distributed.md.
        vocab_start_index: with ``process_group``, the global id of this rank's first row of
            ``student_weight``; None: shards in rank order (needed only with the hard term).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or the leading shape for "none".
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on "
                         f"{student_hidden.device}")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} differs "
                         f"from student_hidden leading shape {tuple(lead)}")
    V = student_weight.shape[0]
    if teacher_weight.shape[0] < V:
        raise ValueError(f"teacher_weight vocabulary ({teacher_weight.shape[0]}) is smaller than "
                         f"student_weight vocabulary ({V}); the teacher may only be wider (padded)")
    div = D.get(divergence)
    param, T, sw, hw = check_options(div, beta, alpha, temperature, soft_weight, hard_weight,
                                     ignore_index, reduction, labels, num_items_in_batch)
    cap = 0.0 if softcap is None else _check_number("softcap", softcap, positive=True)
    if grad_weight_dtype is None:
        grad_weight_dtype = student_weight.dtype
    if grad_weight_dtype not in (torch.float32, student_weight.dtype):
        raise ValueError(f"grad_weight_dtype must be torch.float32 or the weight dtype "
                         f"({student_weight.dtype}), got {grad_weight_dtype}")
    distributed.check_args(process_group, vocab_start_index, backend)
    N = math.prod(lead)
    if chunk_size is None:
        chunk = auto_chunk_size(N, V, student_hidden.device)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = int(chunk_size)
    # with a process group the label range is the global vocabulary, checked by distributed
    flat_labels = _check_labels(labels, lead, student_hidden.device,
                                V if process_group is None else None, int(ignore_index))
    name = (None if process_group is not None
            else _choose_backend(backend, student_hidden.device, student_hidden.dtype))

    hs = student_hidden.reshape(N, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(N, teacher_hidden.shape[-1])
    wt = teacher_weight.detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    scalars = (name, div.id, param, T, sw, hw, int(ignore_index), cap, chunk,
               grad_weight_dtype == torch.float32)
    grad_on = torch.is_grad_enabled()
    nh = grad_on and hs.requires_grad
    nw = grad_on and student_weight.requires_grad
    nb = grad_on and student_bias is not None and student_bias.requires_grad

    if process_group is not None:
        cd = reference.compute_dtype(student_hidden.dtype)
        start = vocab_start_index
        if hw != 0.0 and start is None:  # once per call, not per chunk
            start = distributed.shard_start(V, process_group, student_hidden.device)
        scale = _row_scale("batchmean" if reduction == "mean" else reduction, N, V, flat_labels,
                           int(ignore_index), num_items_in_batch, cd, student_hidden.device)
        out = _VocabParallelFusedKD.apply(hs, student_weight, student_bias, ht, wt, bt,
                                          flat_labels, scale, process_group, start,
                                          reduction == "none", reduction == "mean", scalars[1:],
                                          (nh, nw, nb))
        return out.view(lead) if reduction == "none" else out

    if reduction == "none" or not (nh or nw or nb):
        rows = fused_linear_kd_rows(hs, student_weight, student_bias, ht, wt, bt, flat_labels,
                                    *scalars)
        if reduction == "none":
            return rows.view(lead)
        scale = _row_scale(reduction, N, V, flat_labels, int(ignore_index), num_items_in_batch,
                           rows.dtype, rows.device)
        return rows.sum() * scale
    cd = reference.compute_dtype(student_hidden.dtype)
    scale = _row_scale(reduction, N, V, flat_labels, int(ignore_index), num_items_in_batch, cd,
                       student_hidden.device)
    loss, *_ = fused_linear_kd(hs, student_weight, student_bias, ht, wt, bt, flat_labels, scale,
                               *scalars, nh, nw, nb)
    return loss


class FusedLinearKDLoss(torch.nn.Module):
    """``fused_linear_kd_loss`` as a module; options fixed (and checked) at construction.

    >>> crit = FusedLinearKDLoss(divergence="forward_kl", temperature=2.0)
    >>> loss = crit(h_s, lm_head_s.weight, h_t, lm_head_t.weight, labels)   # doctest: +SKIP
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 ignore_index: int = -100, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 reduction: str = "batchmean", beta: Optional[float] = None,
                 alpha: Optional[float] = None, backend: str = "auto",
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 grad_weight_dtype: Optional[torch.dtype] = torch.float32,
                 process_group=None, vocab_start_index: Optional[int] = None):
        super().__init__()
        D.resolve_param(D.get(divergence), beta, alpha)
        _check_number("temperature", temperature, positive=True)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.options = dict(divergence=divergence, temperature=temperature,
                            ignore_index=ignore_index, soft_weight=soft_weight,
                            hard_weight=hard_weight, reduction=reduction, beta=beta, alpha=alpha,
                            backend=backend, softcap=softcap, chunk_size=chunk_size,
                            grad_weight_dtype=grad_weight_dtype, process_group=process_group,
                            vocab_start_index=vocab_start_index)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, student_bias=student_bias,
                                    teacher_bias=teacher_bias, labels=labels,
                                    num_items_in_batch=num_items_in_batch, **self.options)
