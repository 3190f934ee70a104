"""The C++ CPU backend of ``sparse_kd_loss``: ``forward`` / ``backward`` with the signatures of
``kdkernels.sparse._ReferenceStats`` and ``kdkernels.triton.sparse_launch``, over the ops
``torch.ops.kdkernels_C.sparse_stats`` / ``sparse_grad`` (csrc/cpu/sparse_cpu.cpp).

Thin: checks, then one op call each; no autograd here (``kdkernels.sparse._StudentStats``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpp

__all__ = ["forward", "backward", "unavailable_reason"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _has_ops() -> bool:
    return hasattr(torch.ops.kdkernels_C, "sparse_stats") and hasattr(torch.ops.kdkernels_C,
                                                                        "sparse_grad")


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the C++ sparse kernels can run on these logits, else why not."""
    reason = cpp.unavailable_reason("cpu")
    if reason is None and not _has_ops():
        reason = ("kdkernels._C was built without csrc/cpu/sparse_cpu.cpp: rebuild with "
                  "`python setup.py build_ext --inplace`")
    if reason is None and device.type != "cpu":
        reason = f"it runs on CPU tensors only, got {device.type}"
    if reason is None and dtype not in _DTYPES:
        reason = f"it does not accept {dtype} logits (fp32, bf16, fp16 only)"
    return reason


if cpp.unavailable_reason("cpu") is None and _has_ops():
    @torch.library.register_fake("kdkernels_C::sparse_stats")
    def _stats_fake(s, idx, labels, temperature, need_b, need_a):
        n = s.shape[0] * s.shape[1]
        return (s.new_empty((n, 3), dtype=torch.float32),
                s.new_empty((n, idx.shape[1]), dtype=torch.float32))

    @torch.library.register_fake("kdkernels_C::sparse_grad")
    def _grad_fake(s, stats, idx, labels, temperature, need_b, need_a, c_b, c_a, g_idx, g_lab):
        return torch.empty(s.shape, dtype=s.dtype, device=s.device)


def _check(s3: Tensor, idx: Tensor) -> None:
    assert s3.dim() == 3 and (s3.stride(2) == 1 or s3.shape[2] == 1), "s3: [B, L, V], unit column stride"
    assert s3.dtype in _DTYPES, s3.dtype
    assert idx.dtype == torch.int64 and idx.is_contiguous() and idx.shape[0] == s3.shape[0] * s3.shape[1]


def forward(s3: Tensor, idx: Tensor, labels: Optional[Tensor], T: float, need_b: bool,
            need_a: bool):
    """-> stats [N, 3] fp32 (lse(s/T), lse(s), s[label]; 0 where not needed), gathered [N, K] fp32."""
    _check(s3, idx)
    lab = labels.contiguous() if need_a else None
    return torch.ops.kdkernels_C.sparse_stats(s3, idx, lab, float(T), bool(need_b), bool(need_a))


def backward(s3: Tensor, stats: Tensor, idx: Tensor, labels: Optional[Tensor], T: float,
             need_b: bool, need_a: bool, c_b: Tensor, c_a: Tensor, g_idx: Tensor,
             g_lab: Tensor) -> Tensor:
    """-> grad [B, L, V] in the student dtype (contiguous)."""
    _check(s3, idx)
    lab = labels.contiguous() if need_a else None
    return torch.ops.kdkernels_C.sparse_grad(s3, stats, idx, lab, float(T), bool(need_b),
                                             bool(need_a), c_b, c_a, g_idx, g_lab)
