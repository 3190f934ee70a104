"""The CUDA kernels (csrc/cuda/kd_cuda.cu) on CPU tensors, under a host emulation of the CUDA
execution model (csrc/testing/cuda_emu.h): a test tool, like the Triton interpreter.

With ``KDKERNELS_CUDA_EMULATE=1``, ``backend="cuda"`` accepts CPU tensors and runs the very same
kernel source compiled by the host C++ compiler: each CTA's 256 threads run as fibers (or, with
``KDKERNELS_CUDA_EMULATE_MODE=threads``, as OS threads), ``__syncthreads`` and the warp shuffles
are real barriers, ``__shared__`` is per-CTA storage. The extension is built on first use with
``torch.utils.cpp_extension.load`` (ninja, -O2, about a minute) into ``build/cuda_emulate`` of the
source checkout (``KDKERNELS_CUDA_EMULATE_BUILD_DIR`` overrides); a normal install never builds it.
It is never chosen by ``backend="auto"`` and never benchmarked; it needs the csrc/ sources
(an editable install or a checkout) and a C++ compiler.

This module is the backend module of "cuda" while the variable is set (``backends.load``): CUDA
tensors still go to the real kernels (``kdkernels.backends.compiled``), CPU tensors to the emulated ones.
"""
from __future__ import annotations

import os
import shutil
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ENV", "STATS_WIDTH", "enabled", "unavailable_reason", "require", "library",
           "forward_rows", "backward_rows", "forward_rows_given_stats", "forward_rows_with_grad",
           "rescale_rows_", "set_pending_error", "build_directory"]

ENV = "KDKERNELS_CUDA_EMULATE"
from . import (STATS_WIDTH, check_given_stats_div, ensemble_with_grad_by_two_kernels,
               rows_outputs_like, with_grad_by_two_kernels)
from ..divergences import LOGIT_MSE

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CSRC = os.path.join(_ROOT, "csrc")
_SOURCES = [os.path.join(_CSRC, "testing", f)
            for f in ("bindings_cuda_emu.cpp", "kd_cuda_emu.cpp", "cuda_emu.cpp")]
_SOURCES.append(os.path.join(_CSRC, "testing", "bindings_ensemble_cuda_emu.cpp"))  # ensembles
_INCLUDES = [os.path.join(_CSRC, "testing", "include"), os.path.join(_CSRC, "testing"),
             os.path.join(_CSRC, "include"), os.path.join(_CSRC, "cuda")]
_NAME = "kdkernels_cuda_emu"

_lock = threading.Lock()
_loaded = [False]


def enabled() -> bool:
    """True when KDKERNELS_CUDA_EMULATE=1 (read at every call)."""
    return os.environ.get(ENV, "") == "1"


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def unavailable_reason() -> Optional[str]:
    """None when the emulated CUDA backend can run on CPU tensors here (it may still have to be
    built, on first use), else why not."""
    if not enabled():
        return f"the CUDA host emulation is off (set {ENV}=1 to run backend='cuda' on CPU tensors)"
    missing = [p for p in _SOURCES + [os.path.join(_CSRC, "cuda", "kd_cuda.cu")] if not os.path.exists(p)]
    if missing:
        return (f"the CUDA host emulation needs the csrc/ sources of a checkout or editable install "
                f"(missing {missing[0]})")
    if _compiler() is None:
        return "the CUDA host emulation needs a C++ compiler (none found: set CXX)"
    return None


def require() -> None:
    """Raise a clear error unless backend='cuda' may run on CPU tensors."""
    if not enabled():
        raise ValueError(f"backend='cuda' does not run on cpu tensors (it runs on CUDA devices); "
                         f"to run the CUDA kernels on the CPU under their host emulation, a test "
                         f"tool, set {ENV}=1")
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"backend='cuda' on CPU tensors is not available: {reason}")


def build_directory() -> str:
    return os.environ.get("KDKERNELS_CUDA_EMULATE_BUILD_DIR") or os.path.join(_ROOT, "build",
                                                                               "cuda_emulate")


def library():
    """torch.ops.kdkernels_cuda_emu, building the extension on first use."""
    if not _loaded[0]:
        with _lock:
            if not _loaded[0]:
                require()
                from torch.utils.cpp_extension import load
                d = build_directory()
                os.makedirs(d, exist_ok=True)
                load(name=_NAME, sources=_SOURCES, extra_include_paths=_INCLUDES,
                     extra_cflags=["-O2", "-g0", "-std=c++17", "-fno-strict-aliasing"],
                     extra_ldflags=["-lpthread"], build_directory=d, is_python_module=False,
                     verbose=os.environ.get("KDKERNELS_CUDA_EMULATE_VERBOSE") == "1")
                _register_fakes()
                _loaded[0] = True
    return torch.ops.kdkernels_cuda_emu


def _register_fakes() -> None:
    @torch.library.register_fake("kdkernels_cuda_emu::kd_rows_fwd")
    def _fwd(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
             ignore_index):
        return rows_outputs_like(student.float())

    @torch.library.register_fake("kdkernels_cuda_emu::kd_rows_given_stats")
    def _given(student, teacher, labels, stats, div_id, param, temperature, ignore_index):
        return student.new_empty((student.shape[0] * student.shape[1], 2), dtype=torch.float32)
    @torch.library.register_fake("kdkernels_cuda_emu::kd_rows_fwd_grad")
    def _fwd_grad(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
                  ignore_index, grad_scale=None):
        return (rows_outputs_like(student.float())[0],
                torch.empty(student.shape, dtype=student.dtype, device=student.device))

    @torch.library.register_fake("kdkernels_cuda_emu::kd_rows_bwd")
    def _bwd(grad_loss, student, teacher, labels, stats, div_id, param, temperature, soft_weight,
             hard_weight, ignore_index):
        return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _real():
    from . import compiled
    return compiled


def forward_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], div_id: int,
                 param: float, temperature: float, soft_weight: float, hard_weight: float,
                 ignore_index: int) -> Tuple[Tensor, Tensor]:
    if student.device.type != "cpu":
        return _real().forward_rows(student, teacher, labels, div_id, param, temperature,
                                    soft_weight, hard_weight, ignore_index)
    return library().kd_rows_fwd(student, teacher, labels, div_id, param, temperature,
                                 soft_weight, hard_weight, ignore_index)


def backward_rows(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                  stats: Tensor, div_id: int, param: float, temperature: float, soft_weight: float,
                  hard_weight: float, ignore_index: int) -> Tensor:
    if student.device.type != "cpu":
        return _real().backward_rows(grad_loss, student, teacher, labels, stats, div_id, param,
                                     temperature, soft_weight, hard_weight, ignore_index)
    return library().kd_rows_bwd(grad_loss, student, teacher, labels, stats, div_id, param,
                                 temperature, soft_weight, hard_weight, ignore_index)


def forward_rows_given_stats(student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                             stats: Tensor, div_id: int, param: float, temperature: float,
                             ignore_index: int) -> Tensor:
    check_given_stats_div(div_id, "cuda")
    if student.device.type != "cpu":
        return _real().forward_rows_given_stats(student, teacher, labels, stats, div_id, param,
                                                temperature, ignore_index)
    return library().kd_rows_given_stats(student, teacher, labels, stats, div_id, param,
                                         temperature, ignore_index)
def forward_rows_with_grad(student: Tensor, teacher: Tensor, labels: Optional[Tensor], div_id: int,
                           param: float, temperature: float, soft_weight: float,
                           hard_weight: float, ignore_index: int,
                           grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    if student.device.type != "cpu":
        return _real().forward_rows_with_grad(student, teacher, labels, div_id, param, temperature,
                                              soft_weight, hard_weight, ignore_index, grad_scale)
    if div_id == LOGIT_MSE:  # as the real backend: its forward and backward kernels
        return with_grad_by_two_kernels(forward_rows, backward_rows, student, teacher, labels,
                                        div_id, param, temperature, soft_weight, hard_weight,
                                        ignore_index, grad_scale)
    return library().kd_rows_fwd_grad(student, teacher, labels, div_id, param, temperature,
                                      soft_weight, hard_weight, ignore_index, grad_scale)


def rescale_rows_(grad: Tensor, grad_loss: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    if grad.device.type != "cpu":
        return _real().rescale_rows_(grad, grad_loss, grad_scale)
    library().kd_rows_rescale_(grad, grad_loss, grad_scale)
    return grad


def set_pending_error(code: int) -> None:
    """Test hook: leave a pending (earlier, unrelated) error in the emulated CUDA runtime."""
    library().set_pending_error(code)


def counters() -> Tuple[int, int, int, int]:
    """Test hook: the emulation's (launches, CTAs, barrier completions, shuffles) since the process
    started; differences around a call tell which launch configuration it ran."""
    return tuple(library().emu_counters())


def forward_rows_ensemble(student: Tensor, teachers, weights, labels: Optional[Tensor], div_id: int,
                          param: float, temperature: float, soft_weight: float, hard_weight: float,
                          ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Teacher ensembles (csrc/cuda/ensemble_cuda.cuh): (loss [N], stats [N, 7 + 2(M - 1)])."""
    if student.device.type != "cpu":
        return _real().forward_rows_ensemble(student, teachers, weights, labels, div_id, param,
                                             temperature, soft_weight, hard_weight, ignore_index)
    return library().kd_rows_ens_fwd(student, list(teachers), [float(w) for w in weights], labels,
                                     div_id, param, temperature, soft_weight, hard_weight,
                                     ignore_index)


def backward_rows_ensemble(grad_loss: Tensor, student: Tensor, teachers, weights,
                           labels: Optional[Tensor], stats: Tensor, div_id: int, param: float,
                           temperature: float, soft_weight: float, hard_weight: float,
                           ignore_index: int) -> Tensor:
    if student.device.type != "cpu":
        return _real().backward_rows_ensemble(grad_loss, student, teachers, weights, labels, stats,
                                              div_id, param, temperature, soft_weight,
                                              hard_weight, ignore_index)
    return library().kd_rows_ens_bwd(grad_loss, student, list(teachers),
                                     [float(w) for w in weights], labels, stats, div_id, param,
                                     temperature, soft_weight, hard_weight, ignore_index)


def forward_rows_ensemble_with_grad(student: Tensor, teachers, weights, labels: Optional[Tensor],
                                    div_id: int, param: float, temperature: float,
                                    soft_weight: float, hard_weight: float, ignore_index: int,
                                    grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """As the real CUDA backend: the ensemble forward kernels, then the backward one."""
    return ensemble_with_grad_by_two_kernels(
        forward_rows_ensemble, backward_rows_ensemble, student, teachers, weights, labels, div_id,
        param, temperature, soft_weight, hard_weight, ignore_index, grad_scale)
