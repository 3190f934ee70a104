"""Launchers of the ``logit_mse`` Triton kernels (``mse_kernels.py``): the backend contract's
``forward_rows`` / ``backward_rows`` for divergence id 6. ``launch.py`` checks the arguments and
hands div 6 here; no autograd here (``kdkernels.ops.dense``).

Launch configuration: fixed defaults per GPU architecture (``CONFIGS``); ``KDKERNELS_TRITON_BLOCK``
overrides the block size as for the other kernels (``KDKERNELS_AUTOTUNE`` does not apply: these
kernels have no per-divergence state to tune for). Forward keeps four per-lane arrays across its
loop (Σ d, n, and the hard term's max and sum-exp): 2048 columns × 8 warps is 8 values per
thread per array; backward keeps none: 4096 × 8 as the other backward kernel.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton

from .. import STATS_WIDTH
from . import device_guard
from . import mse_kernels as K

__all__ = ["LOGIT_MSE", "CONFIGS", "config", "forward_rows", "backward_rows"]

LOGIT_MSE = 6  # kdkernels.divergences.LOGIT_MSE

# (major, minor) compute capability -> {"mse_fwd" | "mse_bwd": (BLOCK, num_warps)}
CONFIGS = {
    (8, 0): {"mse_fwd": (2048, 8), "mse_bwd": (4096, 8)},
    (9, 0): {"mse_fwd": (2048, 8), "mse_bwd": (4096, 8)},
}
_FALLBACK = {"mse_fwd": (2048, 8), "mse_bwd": (4096, 8)}
_INTERPRETER = {"mse_fwd": (4096, 1), "mse_bwd": (4096, 1)}
_MIN_BLOCK = 16


def config(kind: str, device: torch.device, V: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) of kernel ``kind`` ("mse_fwd" or "mse_bwd") for rows of V columns."""
    if device.type == "cuda":
        block, warps = CONFIGS.get(torch.cuda.get_device_capability(device), _FALLBACK)[kind]
    else:
        block, warps = _INTERPRETER[kind]
    env = os.environ.get("KDKERNELS_TRITON_BLOCK")
    if env:
        block = int(env)
        if block < 1 or block & (block - 1):
            raise ValueError(f"KDKERNELS_TRITON_BLOCK must be a power of two, got {env!r}")
    return min(block, max(_MIN_BLOCK, triton.next_power_of_2(V))), warps


def _modes(soft_weight: float, hard_weight: float, labels: Optional[Tensor]) -> dict:
    return dict(SOFT=soft_weight != 0.0, HAS_LABELS=labels is not None,
                HARD=labels is not None and hard_weight != 0.0)


def forward_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], soft_weight: float,
                 hard_weight: float, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-row loss [N] fp32 and stats [N, STATS_WIDTH] fp32 of checked [B, L, V] views."""
    Bn, L, V = student.shape
    N = Bn * L
    loss = torch.empty((N,), dtype=torch.float32, device=student.device)
    stats = torch.empty((N, STATS_WIDTH), dtype=torch.float32, device=student.device)
    if N == 0:
        return loss, stats
    lab = labels.contiguous() if labels is not None else loss  # any pointer without labels
    block, warps = config("mse_fwd", student.device, V)
    with device_guard(student):
        K.kd_mse_fwd_kernel[(N,)](student, teacher, lab, loss, stats, V, L, student.stride(0),
                                  student.stride(1), teacher.shape[1], teacher.stride(0),
                                  teacher.stride(1), float(soft_weight), float(hard_weight),
                                  ignore_index, **_modes(soft_weight, hard_weight, labels),
                                  BLOCK=block, num_warps=warps)
    return loss, stats


def backward_rows(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                  stats: Tensor, soft_weight: float, hard_weight: float, ignore_index: int,
                  out: Tensor) -> Tensor:
    """The gradient into ``out`` (checked by the caller; it may be ``student`` itself)."""
    Bn, L, V = student.shape
    N = Bn * L
    if N == 0 or V == 0:
        return out
    lab = labels.contiguous() if labels is not None else stats
    block, warps = config("mse_bwd", student.device, V)
    with device_guard(student):
        K.kd_mse_bwd_kernel[(N,)](student, teacher, lab, stats, grad_loss, out, V, L,
                                  student.stride(0), student.stride(1), teacher.shape[1],
                                  teacher.stride(0), teacher.stride(1), out.stride(0),
                                  out.stride(1), float(soft_weight), float(hard_weight),
                                  ignore_index, **_modes(soft_weight, hard_weight, labels),
                                  BLOCK=block, num_warps=warps)
    return out
