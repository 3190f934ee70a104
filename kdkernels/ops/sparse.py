"""The student side of ``sparse_kd_loss`` as ops: per-row statistics of the full student row
and its gathered top-k logits, differentiable (schema, fake kernels, autograd).

``kdkernels::sparse_stats``: s3 [B, L, V] -> (stats [N, 3] = (lse(s/T), lse(s), s[label]),
gathered s[idx] [N, K]); ``kdkernels::sparse_grad`` is its backward: the dense gradient
c_b·softmax(s/T) + c_a·softmax(s) plus the sparse terms at idx and label. Both call the backend
module that ``kdkernels.backends`` names ("sparse" capability).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..checks import compute_dtype

__all__ = ["sparse_stats", "sparse_grad"]


@torch.library.custom_op("kdkernels::sparse_stats", mutates_args=())
def sparse_stats(s3: Tensor, idx: Tensor, labels: Optional[Tensor], temperature: float,
                 need_b: bool, need_a: bool, backend: str) -> Tuple[Tensor, Tensor]:
    stats, gathered = backends.load(backend).sparse_stats(s3, idx, labels, temperature, need_b,
                                                          need_a)
    return stats, gathered


@sparse_stats.register_fake
def _(s3, idx, labels, temperature, need_b, need_a, backend):
    n, cd = idx.shape[0], compute_dtype(s3.dtype)
    return s3.new_empty((n, 3), dtype=cd), s3.new_empty((n, idx.shape[1]), dtype=cd)


@torch.library.custom_op("kdkernels::sparse_grad", mutates_args=())
def sparse_grad(s3: Tensor, stats: Tensor, idx: Tensor, labels: Optional[Tensor],
                temperature: float, need_b: bool, need_a: bool, c_b: Tensor, c_a: Tensor,
                g_idx: Tensor, g_lab: Tensor, backend: str) -> Tensor:
    return backends.load(backend).sparse_grad(s3, stats, idx, labels, temperature, need_b, need_a,
                                              c_b, c_a, g_idx, g_lab)


@sparse_grad.register_fake
def _(s3, stats, idx, labels, temperature, need_b, need_a, c_b, c_a, g_idx, g_lab, backend):
    return torch.empty(s3.shape, dtype=s3.dtype, device=s3.device)


def _setup(ctx, inputs, output):
    s3, idx, labels, temperature, need_b, need_a, backend = inputs
    ctx.save_for_backward(s3, output[0], idx, labels)
    ctx.cfg = (temperature, need_b, need_a, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_stats, g_gathered):
    s3, stats, idx, labels = ctx.saved_tensors
    T, need_b, need_a, backend = ctx.cfg
    if not ctx.needs_input_grad[0] or (g_stats is None and g_gathered is None):
        return (None,) * 7
    n, cd = stats.shape[0], stats.dtype
    if g_stats is None:
        g_stats = torch.zeros((n, 3), dtype=cd, device=stats.device)
    g_stats = g_stats.to(cd)
    if g_gathered is None:
        g_gathered = torch.zeros(idx.shape, dtype=cd, device=stats.device)
    c_b = (g_stats[:, 0] / T).contiguous()   # d lse(s/T) / ds = softmax(s/T) / T
    c_a = g_stats[:, 1].contiguous()
    g_lab = g_stats[:, 2].contiguous()
    grad = sparse_grad(s3, stats, idx, labels, T, need_b, need_a, c_b, c_a,
                       g_gathered.to(cd).contiguous(), g_lab, backend)
    return (grad,) + (None,) * 6


torch.library.register_autograd("kdkernels::sparse_stats", _backward, setup_context=_setup)
