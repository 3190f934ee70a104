"""The compiled backends "cpu" and "cuda": the backend contract of ``kdkernels.backends`` over the
``torch.ops.kdkernels_C`` ops of the C++ extensions (dense rows; sparse top-k statistics on CPU).

``kdkernels._C`` holds the op schemas and the CPU kernels (always built); ``kdkernels._C_cuda``
registers CUDA implementations of the same ops (built only where torch has CUDA and nvcc exists).
Importing this module never fails when they are missing: ``unavailable_reason(device)`` says why.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import STATS_WIDTH, rows_outputs_like

__all__ = ["forward_rows", "backward_rows", "forward_rows_with_grad", "forward_rows_given_stats",
           "rescale_rows_", "sparse_stats", "sparse_grad", "unavailable_reason", "divergence_names"]

_BUILD_HINT = "run `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"


def _try_import(name: str) -> Optional[str]:
    try:
        importlib.import_module(name)
    except Exception as e:  # missing file, ABI mismatch, ...
        return f"{type(e).__name__}: {e}"
    return None


_CPU_ERROR = _try_import("kdkernels._C")
_CUDA_ERROR = _try_import("kdkernels._C_cuda") if _CPU_ERROR is None else "kdkernels._C is missing"


def unavailable_reason(device: str) -> Optional[str]:
    """None when the compiled backend for ``device`` ("cpu" or "cuda") can run here, else why."""
    if _CPU_ERROR is not None:
        return f"kdkernels._C not built ({_CPU_ERROR}): {_BUILD_HINT}"
    if device == "cpu":
        return None
    if device == "cuda":
        if _CUDA_ERROR is not None:
            return (f"kdkernels._C_cuda not built ({_CUDA_ERROR}): built without CUDA; rebuild on a "
                    f"machine where torch has CUDA and nvcc exists, or set KDKERNELS_BUILD_CUDA=1")
        if not torch.cuda.is_available():
            return "no CUDA device available"
        return None
    return f"no compiled backend for device {device!r}"


# Fakes of the kdkernels_C ops themselves, for torch.library.opcheck and for callers that trace
# them directly; the kdkernels:: ops above them have their own (kdkernels.ops). Same shape helper.
if _CPU_ERROR is None:
    @torch.library.register_fake("kdkernels_C::kd_rows_fwd")
    def _fwd_fake(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
                  ignore_index):
        return rows_outputs_like(student.float(), STATS_WIDTH)

    @torch.library.register_fake("kdkernels_C::kd_rows_fwd_grad")
    def _fwd_grad_fake(student, teacher, labels, div_id, param, temperature, soft_weight,
                       hard_weight, ignore_index, grad_scale):
        return (rows_outputs_like(student.float())[0],
                torch.empty(student.shape, dtype=student.dtype, device=student.device))

    @torch.library.register_fake("kdkernels_C::kd_rows_given_stats")
    def _given_fake(student, teacher, labels, stats, div_id, param, temperature, ignore_index):
        return student.new_empty((student.shape[0] * student.shape[1], 2), dtype=torch.float32)

    @torch.library.register_fake("kdkernels_C::kd_rows_bwd")
    def _bwd_fake(grad_loss, student, teacher, labels, stats, div_id, param, temperature,
                  soft_weight, hard_weight, ignore_index):
        return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _require(device: torch.device) -> None:
    reason = unavailable_reason(device.type)
    if reason is not None:
        raise RuntimeError(f"kdkernels compiled backend for {device.type} is unavailable: {reason}")


def divergence_names() -> list:
    """Divergence names in id order as compiled into the C++ code (kd_math.h)."""
    _require(torch.device("cpu"))
    return list(torch.ops.kdkernels_C.divergence_names())


def forward_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], div_id: int,
                 param: float, temperature: float, soft_weight: float, hard_weight: float,
                 ignore_index: int) -> Tuple[Tensor, Tensor]:
    _require(student.device)
    return torch.ops.kdkernels_C.kd_rows_fwd(student, teacher, labels, div_id, param, temperature,
                                             soft_weight, hard_weight, ignore_index)


def backward_rows(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                  stats: Tensor, div_id: int, param: float, temperature: float, soft_weight: float,
                  hard_weight: float, ignore_index: int) -> Tensor:
    _require(student.device)
    return torch.ops.kdkernels_C.kd_rows_bwd(grad_loss, student, teacher, labels, stats, div_id,
                                             param, temperature, soft_weight, hard_weight,
                                             ignore_index)


def forward_rows_given_stats(student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                             stats: Tensor, div_id: int, param: float, temperature: float,
                             ignore_index: int) -> Tensor:
    """[N, 2] fp32: per row Σφ and Σ q·g over the student's columns with the normalisers given in
    ``stats`` (the kernel contract, ``kdkernels.backends``)."""
    _require(student.device)
    return torch.ops.kdkernels_C.kd_rows_given_stats(student, teacher, labels, stats, div_id,
                                                     param, temperature, ignore_index)


def forward_rows_with_grad(student: Tensor, teacher: Tensor, labels: Optional[Tensor], div_id: int,
                           param: float, temperature: float, soft_weight: float,
                           hard_weight: float, ignore_index: int,
                           grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Optional backend function: per-row losses and G[i] = grad_scale[i] · d loss_i / d student_i
    (the gradient for grad_loss = grad_scale, a float32 [N] tensor; ones when None) in one call;
    G is a new contiguous tensor in the student dtype. CPU: the row stays in cache between the
    passes; CUDA: one kernel (forward_grad_kernel), the statistics kept in registers."""
    _require(student.device)
    return torch.ops.kdkernels_C.kd_rows_fwd_grad(student, teacher, labels, div_id, param,
                                                  temperature, soft_weight, hard_weight,
                                                  ignore_index, grad_scale)


def rescale_rows_(grad: Tensor, grad_loss: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    """"grad_rescale" (CUDA tensors): in place, grad rows times grad_loss / grad_scale, rows whose
    ratio is exactly 1 untouched (see ops.dense._backward_with_grad). Returns ``grad``."""
    _require(grad.device)
    if grad.device.type != "cuda":
        raise RuntimeError("rescale_rows_ is implemented for CUDA tensors only")
    torch.ops.kdkernels_C.kd_rows_rescale_(grad, grad_loss, grad_scale)
    return grad


# ---- sparse top-k student statistics (csrc/cpu/sparse_cpu.cpp) ----------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if _CPU_ERROR is None:
    @torch.library.register_fake("kdkernels_C::sparse_stats")
    def _stats_fake(s, idx, labels, temperature, need_b, need_a):
        n = s.shape[0] * s.shape[1]
        return (s.new_empty((n, 3), dtype=torch.float32),
                s.new_empty((n, idx.shape[1]), dtype=torch.float32))

    @torch.library.register_fake("kdkernels_C::sparse_grad")
    def _grad_fake(s, stats, idx, labels, temperature, need_b, need_a, c_b, c_a, g_idx, g_lab):
        return torch.empty(s.shape, dtype=s.dtype, device=s.device)


def _check_sparse(s3: Tensor, idx: Tensor) -> None:
    assert s3.dim() == 3 and (s3.stride(2) == 1 or s3.shape[2] == 1), "s3: [B, L, V], unit column stride"
    assert s3.dtype in _DTYPES, s3.dtype
    assert idx.dtype == torch.int64 and idx.is_contiguous() and idx.shape[0] == s3.shape[0] * s3.shape[1]


def sparse_stats(s3: Tensor, idx: Tensor, labels: Optional[Tensor], T: float, need_b: bool,
            need_a: bool):
    """-> stats [N, 3] fp32 (lse(s/T), lse(s), s[label]; 0 where not needed), gathered [N, K] fp32."""
    _check_sparse(s3, idx)
    lab = labels.contiguous() if need_a else None
    return torch.ops.kdkernels_C.sparse_stats(s3, idx, lab, float(T), bool(need_b), bool(need_a))


def sparse_grad(s3: Tensor, stats: Tensor, idx: Tensor, labels: Optional[Tensor], T: float,
             need_b: bool, need_a: bool, c_b: Tensor, c_a: Tensor, g_idx: Tensor,
             g_lab: Tensor) -> Tensor:
    """-> grad [B, L, V] in the student dtype (contiguous)."""
    _check_sparse(s3, idx)
    lab = labels.contiguous() if need_a else None
    return torch.ops.kdkernels_C.sparse_grad(s3, stats, idx, lab, float(T), bool(need_b),
                                             bool(need_a), c_b, c_a, g_idx, g_lab)
