"""The fused linear (lm_head) ops: the chunked loop and its custom ops (schema, fake, autograd).

For each chunk of ``c`` tokens the loop computes the teacher logits (no gradient) and the student
logits, hands both to the backend for the per-row loss and the logits-gradient, and turns that
gradient into the hidden, weight and bias gradients at once (``grad_h[chunk] = g @ W``,
``grad_W += gᵀ @ h``). The chunk's logits are then dropped: memory O(c·V), not O(N·V).

``kdkernels::fused_linear_kd``: the reduced loss (the row weights known in advance), its
gradients formed in forward, backward only scales them. ``kdkernels::fused_linear_kd_rows`` /
``..._rows_backward``: per-row losses, backward recomputes the chunks. See docs/fused_linear.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..backends import reference
from ..checks import Options, compute_dtype

__all__ = ["LinearConfig", "run_chunks", "backend_rows", "fused_linear_kd", "fused_linear_kd_rows",
           "fused_linear_kd_rows_backward"]


@dataclass(frozen=True)
class LinearConfig:
    """The fused-linear options beyond ``Options``."""
    softcap: float           # cap·tanh(z/cap) on both logits when > 0
    chunk_size: int          # rows per chunk
    weight_grad_fp32: bool   # accumulate the weight and bias gradients in fp32


def backend_rows(backend: str) -> Callable:
    """``rows_fn`` of ``run_chunks`` for a backend name: per-row losses of a [c, V] chunk and,
    when ``grad_rows`` is given, the gradient of Σ grad_rows[i]·loss[i] w.r.t. the chunk."""
    if backend == "reference":
        return reference.rows_with_grad

    def rows_fn(s: Tensor, t: Tensor, labels: Optional[Tensor], grad_rows: Optional[Tensor],
                args: tuple) -> Tuple[Tensor, Optional[Tensor]]:
        s3, t3 = s.unsqueeze(0), t.unsqueeze(0)
        mod = backends.load(backend)
        rows, stats = mod.forward_rows(s3, t3, labels, *args)
        if grad_rows is None:
            return rows, None
        g = mod.backward_rows(grad_rows.to(torch.float32).contiguous(), s3, t3, labels, stats,
                              *args)
        return rows, g[0]
    return rows_fn


def _fp32_mm(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Optional[Tensor]:
    """``h @ wᵀ (+ b)`` of half inputs with an fp32 output straight from the GEMM's fp32
    accumulator (``torch.mm(..., out_dtype=torch.float32)``, CUDA, torch >= 2.9); None where this
    torch or device lacks it."""
    if h.device.type != "cuda":
        return None
    try:
        z = torch.mm(h, w.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return None
    return z if b is None else z + b.to(torch.float32)


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor], softcap: float,
            w_up: Optional[Tensor] = None):
    """``h @ wᵀ + b`` in the compute dtype (fp32; float64 for float64), soft-capped when
    ``softcap`` > 0. Returns (logits, tanh or None); the tanh is what the soft-cap gradient needs.

    Half inputs (bf16, fp16) never round the logits to their own dtype: the GEMM's fp32
    accumulator is returned as is (``out_dtype=torch.float32`` where supported), else the chunk
    is multiplied in fp32 (``w_up``: the weight upcast once per call by the caller). Rounding the
    logits to bf16 first cost ~1e-2 relative gradient error (docs/fused_linear.md)."""
    cd = compute_dtype(h.dtype)
    if h.dtype == cd:
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    else:
        z = _fp32_mm(h, w, b)
        if z is None:
            wu = w_up if w_up is not None else w.to(cd)
            z = h.to(cd) @ wu.t()
            if b is not None:
                z = z + b.to(cd)
    if softcap <= 0.0:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, th


def upcast_weight(h: Tensor, w: Tensor) -> Optional[Tensor]:
    """The weight in the compute dtype, once per call, for devices whose GEMM has no fp32 output
    for half inputs (CPU); None where not needed."""
    cd = compute_dtype(h.dtype)
    if h.dtype == cd or w.dtype == cd:
        return None
    if h.device.type == "cuda" and _fp32_mm(h[:1], w[:1], None) is not None:
        return None
    return w.to(cd)


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


def run_chunks(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
               bt: Optional[Tensor], labels: Optional[Tensor], grad_rows: Optional[Tensor],
               rows_fn: Callable, opts: Options, cfg: LinearConfig, need=(False, False, False)):
    """The chunked loop. ``hs`` [N, Ds], ``ws`` [V, Ds], ``ht`` [N, Dt], ``wt`` [Vt >= V, Dt].

    ``rows_fn(s, t, labels, grad_rows, args)`` gives the per-row losses of a [c, V] chunk of
    logits and, when ``grad_rows`` is given, their logits-gradient (``backend_rows`` for a
    backend; vocab shards bring their own). ``grad_rows`` (broadcastable to [N]) weights the rows
    for the gradients; None computes the losses only. ``need``: which of the hidden, weight and
    bias gradients to form. Returns (rows [N], grad_hidden, grad_weight, grad_bias), the
    gradients of Σ grad_rows[i]·rows[i] (empty [0] tensors where not asked for).
    """
    need_hidden, need_weight, need_bias = need
    softcap, chunk_size, weight_grad_fp32 = cfg.softcap, cfg.chunk_size, cfg.weight_grad_fp32
    ignore_index = opts.ignore_index
    N, V = hs.shape[0], ws.shape[0]
    args = opts.scalars()
    rows = torch.empty(N, dtype=compute_dtype(hs.dtype), device=hs.device)
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
    # logits in fp32 (float64 for float64) from the GEMM's accumulator, never rounded to bf16
    wt_up, ws_up = upcast_weight(ht, wt_v), upcast_weight(hs, ws)
    for i0 in range(0, N, chunk_size):
        i1 = min(N, i0 + chunk_size)
        lab = None if labels is None else labels[i0:i1]
        with torch.no_grad():
            t, _ = _logits(ht[i0:i1], wt_v, bt_v, softcap, wt_up)
            t = t.to(compute_dtype(hs.dtype))  # the student's compute dtype (a float64 teacher too)
            h = hs[i0:i1]
            s, th = _logits(h, ws, bs, softcap, ws_up)
        r, g = rows_fn(s, t, lab, grad_rows[i0:i1] if want else None, args)
        rows[i0:i1] = r
        del t, s
        if g is None:
            continue
        if th is not None:  # d(cap·tanh(z/cap))/dz = 1 − tanh²
            g = g.to(th.dtype) * (1.0 - th * th)
        del th
        g = g.to(hs.dtype)  # the logits gradient enters the GEMMs in the input dtype
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
    """loss = Σ scale_i·rows_i (0-dim; ``scale`` the [N] row weights of the reduction), and its
    gradients w.r.t. hs, ws, bs, formed in forward."""
    rows, gh, gw, gb = run_chunks(
        hs, ws, bs, ht, wt, bt, labels, scale, backend_rows(backend),
        Options(div_id, param, temperature, soft_weight, hard_weight, ignore_index),
        LinearConfig(softcap, chunk_size, weight_grad_fp32), (need_hidden, need_weight, need_bias))
    return (rows * scale.to(rows.dtype)).sum(), gh, gw, gb


@fused_linear_kd.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, scale, backend, div_id, param, temperature, soft_weight,
      hard_weight, ignore_index, softcap, chunk_size, weight_grad_fp32, need_hidden, need_weight,
      need_bias):
    loss = hs.new_empty((), dtype=compute_dtype(hs.dtype))
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
    return run_chunks(hs, ws, bs, ht, wt, bt, labels, None, backend_rows(backend),
                      Options(div_id, param, temperature, soft_weight, hard_weight, ignore_index),
                      LinearConfig(softcap, chunk_size, weight_grad_fp32))[0]


@fused_linear_kd_rows.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, *scalars):
    return hs.new_empty(hs.shape[:1], dtype=compute_dtype(hs.dtype))


@torch.library.custom_op("kdkernels::fused_linear_kd_rows_backward", mutates_args=())
def fused_linear_kd_rows_backward(grad_rows: Tensor, hs: Tensor, ws: Tensor, bs: Optional[Tensor],
                                  ht: Tensor, wt: Tensor, bt: Optional[Tensor],
                                  labels: Optional[Tensor], backend: str, div_id: int,
                                  param: float, temperature: float, soft_weight: float,
                                  hard_weight: float, ignore_index: int, softcap: float,
                                  chunk_size: int, weight_grad_fp32: bool, need_hidden: bool,
                                  need_weight: bool, need_bias: bool
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    _, gh, gw, gb = run_chunks(
        hs, ws, bs, ht, wt, bt, labels, grad_rows, backend_rows(backend),
        Options(div_id, param, temperature, soft_weight, hard_weight, ignore_index),
        LinearConfig(softcap, chunk_size, weight_grad_fp32), (need_hidden, need_weight, need_bias))
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


