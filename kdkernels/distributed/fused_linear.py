"""Vocab-parallel fused linear loss: the lm_heads sharded by vocabulary over a process group.

Every rank holds a vocabulary shard of the student and teacher weights and the same (replicated)
hidden states. The ordinary chunk loop (``kdkernels.ops.fused_linear.run_chunks``) runs on the
local shard with ``ShardRows`` in place of a backend: each chunk's per-row losses and local
logits-gradient come from ``vocab_parallel_rows`` (its collectives, forward only) and
``torch.autograd.grad`` (its backward has no collective). ``grad_weight`` and ``grad_bias`` are
local; the hidden gradient Σ_ranks g_local @ W_local is summed by ONE all_reduce over the whole
[N, Ds] buffer after the loop.
"""
from __future__ import annotations

import torch

from ..ops.fused_linear import run_chunks
from .vocab_parallel import vocab_parallel_rows

__all__ = ["ShardRows", "VocabParallelFusedKD"]


class ShardRows:
    """The per-chunk rows of a vocabulary shard: ``vocab_parallel_rows`` (the
    collectives of the statistics, in forward only) and, for the gradient, autograd through it
    (its backward is local). Remembers the global vocabulary size it returns."""

    def __init__(self, group, start, backend="reference"):
        self.group, self.start, self.backend, self.vocab_size = group, start, backend, None

    def __call__(self, s, t, labels, grad_rows, args):
        if grad_rows is None:
            with torch.no_grad():
                rows, self.vocab_size = vocab_parallel_rows(
                    s.unsqueeze(0), t.unsqueeze(0), labels, self.group, self.start, *args,
                    backend=self.backend)
            return rows, None
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            rows, self.vocab_size = vocab_parallel_rows(
                leaf.unsqueeze(0), t.unsqueeze(0), labels, self.group, self.start, *args,
                backend=self.backend)
            (g,) = torch.autograd.grad(rows, leaf, grad_rows.to(rows.dtype).expand_as(rows))
        return rows.detach(), g


class VocabParallelFusedKD(torch.autograd.Function):
    """The fused loss on vocabulary shards. ``per_row`` False: returns the scalar
    scale·Σ rows (/ V_global for "mean"), its gradients formed in forward; True: returns the rows
    [N], and backward recomputes the chunks with the incoming per-row gradients (which must be
    the same on every rank, as the rows are). Collectives: those of ``vocab_parallel_rows`` per
    chunk, plus one all_reduce SUM of the hidden gradient per gradient computation."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, scale, group, start, per_row, mean, opts, cfg,
                want, backend):
        nh, nw, nb = want  # which gradients (grad mode is off in here: the caller decides)
        ctx.set_materialize_grads(False)
        ctx.per_row, ctx.need = per_row, (nh, nw, nb)
        if per_row:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels)
            ctx.group, ctx.start, ctx.opts, ctx.cfg = group, start, opts, cfg
            ctx.backend = backend
            return run_chunks(hs, ws, bs, ht, wt, bt, labels, None,
                              ShardRows(group, start, backend), opts, cfg)[0]
        rows, gh, gw, gb, vocab_size = _vocab_parallel_run(
            hs, ws, bs, ht, wt, bt, labels, scale, group, start, opts, cfg, (nh, nw, nb), backend)
        loss = (rows * scale.to(rows.dtype)).sum()
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
        out = [None] * 16
        if grad_out is None or not (nh or nw or nb):
            return tuple(out)
        if ctx.per_row:  # recompute the chunks with the per-row gradients
            hs, ws, bs, ht, wt, bt, labels = ctx.saved_tensors
            _, gh, gw, gb, _ = _vocab_parallel_run(hs, ws, bs, ht, wt, bt, labels, grad_out,
                                                   ctx.group, ctx.start, ctx.opts, ctx.cfg,
                                                   (nh, nw, nb), ctx.backend)
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


def _vocab_parallel_run(hs, ws, bs, ht, wt, bt, labels, grad_rows, group, start, opts, cfg, need,
                        backend):
    """``_run`` on the local shard, then the hidden gradient summed over the group (one
    all_reduce over the whole buffer, issued by every rank even for an empty batch).
    Returns (rows, grad_hidden, grad_weight, grad_bias, global vocabulary size or None)."""
    shard = ShardRows(group, start, backend)
    rows, gh, gw, gb = run_chunks(hs, ws, bs, ht, wt, bt, labels, grad_rows, shard, opts, cfg, need)
    if need[0]:
        torch.distributed.all_reduce(gh, op=torch.distributed.ReduceOp.SUM, group=group)
    return rows, gh, gw, gb, shard.vocab_size


