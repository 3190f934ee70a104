"""Launchers of the sparse top-k kernels: checks, allocation, grid (thin; no autograd here).

``sparse_stats`` and ``sparse_grad`` have the signatures of the reference backend's
(``kdkernels.backends.reference``); ``launch.py`` exports them as part of the triton backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import device_guard, require_launchable
from .sparse_kernels import sparse_grad_dense_kernel, sparse_grad_fixup_kernel, sparse_stats_kernel

BLOCK_V = 4096      # columns per block (tests may lower it to exercise several blocks)
MAX_BLOCK_K = 256   # gathered slots per block
NUM_WARPS = 8


def _block_v(V: int) -> int:
    return max(16, min(BLOCK_V, triton.next_power_of_2(V)))


def _block_k(K: int) -> int:
    return max(16, min(MAX_BLOCK_K, triton.next_power_of_2(K)))


def _check(s3: torch.Tensor, idx: torch.Tensor) -> None:
    assert s3.dim() == 3 and (s3.stride(2) == 1 or s3.shape[2] == 1), "s3: [B, L, V], unit column stride"
    assert s3.dtype in (torch.float32, torch.bfloat16, torch.float16), s3.dtype
    assert idx.dtype == torch.int64 and idx.is_contiguous() and idx.shape[0] == s3.shape[0] * s3.shape[1]
    assert idx.device == s3.device, (idx.device, s3.device)
    require_launchable(s3, "the triton sparse kernels")


def sparse_stats(s3: torch.Tensor, idx: torch.Tensor, labels: Optional[torch.Tensor], T: float,
            need_b: bool, need_a: bool):
    _check(s3, idx)
    Bd, L, V = s3.shape
    N, K = idx.shape
    stats = torch.zeros((N, 3), dtype=torch.float32, device=s3.device)
    gathered = torch.zeros((N, K), dtype=torch.float32, device=s3.device)
    if N == 0:
        return stats, gathered
    lab = labels.contiguous() if need_a else idx  # any int64 pointer when unused
    with device_guard(s3):
        sparse_stats_kernel[(N,)](s3, s3.stride(0), s3.stride(1), L, V, idx, K, lab, stats,
                                  gathered, 1.0 / T, NEED_B=need_b, NEED_A=need_a,
                                  BLOCK_V=_block_v(V), BLOCK_K=_block_k(K), num_warps=NUM_WARPS)
    return stats, gathered


def sparse_grad(s3: torch.Tensor, stats: torch.Tensor, idx: torch.Tensor,
             labels: Optional[torch.Tensor], T: float, need_b: bool, need_a: bool,
             c_b: torch.Tensor, c_a: torch.Tensor, g_idx: torch.Tensor,
             g_lab: torch.Tensor) -> torch.Tensor:
    _check(s3, idx)
    Bd, L, V = s3.shape
    N, K = idx.shape
    grad = torch.empty((Bd, L, V), dtype=s3.dtype, device=s3.device)
    if N == 0:
        return grad
    f32 = dict(dtype=torch.float32)
    c_b, c_a, g_idx, g_lab = (x.to(**f32).contiguous() for x in (c_b, c_a, g_idx, g_lab))
    stats = stats.contiguous()
    lab = labels.contiguous() if need_a else torch.full((N,), -1, dtype=torch.int64,
                                                        device=s3.device)
    common = dict(NEED_B=need_b, NEED_A=need_a, num_warps=NUM_WARPS)
    with device_guard(s3):
        sparse_grad_dense_kernel[(N,)](grad, s3, s3.stride(0), s3.stride(1), L, V, stats, c_b,
                                       c_a, 1.0 / T, BLOCK_V=_block_v(V), **common)
        sparse_grad_fixup_kernel[(N,)](grad, s3, s3.stride(0), s3.stride(1), L, V, stats, c_b,
                                       c_a, idx, g_idx, K, lab, g_lab, 1.0 / T,
                                       BLOCK_K=_block_k(K), **common)
    return grad
