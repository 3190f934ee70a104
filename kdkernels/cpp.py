"""The compiled backends "cpu" and "cuda": the backend contract of ``backends.py`` over the
``torch.ops.kdkernels_C`` ops of the C++ extensions.

``kdkernels._C`` holds the op schemas and the CPU kernels (always built); ``kdkernels._C_cuda``
registers CUDA implementations of the same ops (built only where torch has CUDA and nvcc exists).
Importing this module never fails when they are missing: ``unavailable_reason(device)`` says why.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["STATS_WIDTH", "forward_rows", "backward_rows", "forward_rows_with_grad",
           "unavailable_reason", "divergence_names"]

FORWARD_WITH_GRAD_DEVICES = ("cpu",)  # where forward_rows_with_grad runs (the CPU kernels)
STATS_WIDTH = 7  # per row: (max, log sum-exp) of t/T and s/T, c = sum q g, (max, log sum-exp) of s

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


if _CPU_ERROR is None:
    @torch.library.register_fake("kdkernels_C::kd_rows_fwd")
    def _fwd_fake(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
                  ignore_index):
        n = student.shape[0] * student.shape[1]
        return (student.new_empty((n,), dtype=torch.float32),
                student.new_empty((n, STATS_WIDTH), dtype=torch.float32))

    @torch.library.register_fake("kdkernels_C::kd_rows_fwd_grad")
    def _fwd_grad_fake(student, teacher, labels, div_id, param, temperature, soft_weight,
                       hard_weight, ignore_index, grad_scale):
        n = student.shape[0] * student.shape[1]
        return (student.new_empty((n,), dtype=torch.float32),
                torch.empty(student.shape, dtype=student.dtype, device=student.device))

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


def forward_rows_with_grad(student: Tensor, teacher: Tensor, labels: Optional[Tensor], div_id: int,
                           param: float, temperature: float, soft_weight: float,
                           hard_weight: float, ignore_index: int,
                           grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Optional backend function: per-row losses and G[i] = grad_scale[i] · d loss_i / d student_i
    (the gradient for grad_loss = grad_scale, a float32 [N] tensor; ones when None) in one call;
    G is a new contiguous tensor in the student dtype. Only the CPU kernels implement it (the row
    stays in cache between the passes)."""
    _require(student.device)
    if student.device.type != "cpu":
        raise RuntimeError("forward_rows_with_grad is implemented for CPU tensors only")
    return torch.ops.kdkernels_C.kd_rows_fwd_grad(student, teacher, labels, div_id, param,
                                                  temperature, soft_weight, hard_weight,
                                                  ignore_index, grad_scale)
