"""Thin launcher of the Triton kernels: the backend contract of ``kdkernels.backends``.

Checks the arguments, allocates the outputs (O(N) in forward, one gradient in the student's dtype
in backward, or none with ``out=student`` for the in-place gradient), picks the launch
configuration and launches one program per row. No autograd here (see ``kdkernels.ops.dense``).

Launch configuration: fixed defaults per GPU architecture (``DEFAULT_CONFIGS``). Two environment
variables change it:
  ``KDKERNELS_TRITON_BLOCK=<power of two>`` overrides the block size (tests use small blocks so
      the interpreter walks several blocks per row);
  ``KDKERNELS_AUTOTUNE=1`` autotunes block size and warps per (V, mode) on a GPU (first call per
      key is slow; the interpreter cannot autotune).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton

from .. import (STATS_WIDTH, check_given_stats_div, ensemble_with_grad_by_two_kernels,
               with_grad_by_two_kernels)
from . import device_guard, require_launchable
from . import ensemble_kernels as EK
from . import kernels as K
from . import mse_launch
from .sparse_launch import sparse_grad, sparse_stats  # noqa: F401  (the "sparse" capability)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (major, minor) compute capability -> {"fwd" | "bwd": (BLOCK, num_warps)}. Not yet measured on
# a GPU. Chosen from the ptxas reports of python_tests/test_triton_aot.py and the SASS model
# (benchmarks/gpu_model.py): forward at 1024 columns × 8 warps (4 values per thread per live
# array: the statistics pass keeps 7 per-lane arrays of online state across the loop, and 2048
# made ptxas spill 4 bytes for fp32 forward / reverse KL with the hard term), backward at
# 4096 × 8 (no spills, <= 80 regs).
# "given" (kd_given_stats_kernel, the vocab-parallel pass 2) is forward's second pass alone: its
# block size.
# The ensemble kernels (ensemble_kernels.py): "lse" the per-tensor statistics, "ens_fwd" and
# "ens_bwd" the loss and gradient passes (M teachers loaded per block, one at a time).
_ENSEMBLE_CONFIGS = {"lse": (1024, 8), "ens_fwd": (1024, 8), "ens_bwd": (2048, 8)}
# The fused training kernel (forward_rows_with_grad) runs the forward's passes at the "fwd" block
# and its gradient pass at the "bwd" block, with the forward's warps.
DEFAULT_CONFIGS = {
    (8, 0): {"fwd": (1024, 8), "bwd": (4096, 8), "given": (1024, 8), **_ENSEMBLE_CONFIGS},
    (9, 0): {"fwd": (1024, 8), "bwd": (4096, 8), "given": (1024, 8), **_ENSEMBLE_CONFIGS},
}
_FALLBACK_CONFIG = {"fwd": (1024, 8), "bwd": (4096, 8), "given": (1024, 8), **_ENSEMBLE_CONFIGS}
_INTERPRETER_CONFIG = {k: (4096, 1) for k in _FALLBACK_CONFIG}
_RESCALE_CONFIG = (4096, 8)  # rescale_rows_ (a plain streaming multiply)
_MIN_BLOCK = 16


def _config(kind: str, device: torch.device, V: int) -> Tuple[int, int]:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        block, warps = DEFAULT_CONFIGS.get(cap, _FALLBACK_CONFIG)[kind]
    else:
        block, warps = _INTERPRETER_CONFIG[kind]
    env = os.environ.get("KDKERNELS_TRITON_BLOCK")
    if env:
        block = int(env)
        if block < 1 or block & (block - 1):
            raise ValueError(f"KDKERNELS_TRITON_BLOCK must be a power of two, got {env!r}")
    # No wider than the vocabulary needs (V = 1 or 7 must not walk 4096 masked lanes).
    return min(block, max(_MIN_BLOCK, triton.next_power_of_2(V))), warps


def _autotune() -> bool:
    return os.environ.get("KDKERNELS_AUTOTUNE") == "1"


_TUNED = {}


def _tuned(name: str):
    """Autotuned wrappers, built on first use. The in-place backward restores the student between
    trials (each trial overwrites it with the gradient)."""
    if name not in _TUNED:
        configs = [triton.Config({"BLOCK": b}, num_warps=w)
                   for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16))]
        key = ["V", "DIV", "LIN", "SOFT", "HAS_LABELS", "HARD"]
        if name == "fwd":
            _TUNED[name] = triton.autotune(configs, key=key)(K.kd_fwd_kernel)
        elif name == "bwd":
            _TUNED[name] = triton.autotune(configs, key=key)(K.kd_bwd_kernel)
        else:  # "bwd_inplace"
            tuner = triton.autotune(configs, key=key, restore_value=["s_ptr"])
            _TUNED[name] = tuner(K.kd_bwd_kernel)
    return _TUNED[name]


def _check(student: Tensor, teacher: Tensor, labels: Optional[Tensor]) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be a [B, L, V] view, got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"the triton backend takes fp32, bf16 or fp16 {name} logits, "
                            f"got {x.dtype}")
        if x.shape[2] > 1 and x.stride(2) != 1:
            raise ValueError(f"{name} must have unit stride on the vocabulary dim, "
                             f"got strides {x.stride()}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher dtype {teacher.dtype} differs from student dtype {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if teacher.shape[0] * teacher.shape[1] != student.shape[0] * student.shape[1] \
            or teacher.shape[2] < student.shape[2]:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} does not fit student shape "
                         f"{tuple(student.shape)} (same number of rows B·L and a vocabulary at "
                         "least as wide)")
    require_launchable(student)
    if labels is not None:
        n = student.shape[0] * student.shape[1]
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
            raise TypeError("labels must be None or an int64 tensor")
        if labels.shape != (n,):
            raise ValueError(f"labels must be a [{n}] tensor, got shape {tuple(labels.shape)}")
        if labels.device != student.device:
            raise ValueError(f"labels are on {labels.device} but student is on {student.device}")


def _check_div(div_id: int) -> None:
    if div_id not in range(6):
        raise ValueError(f"unknown divergence id {div_id}")


def _linear(div_id, param) -> bool:
    """LIN of the kernels: jsd (2), skew_kl (3) and skew_reverse_kl (4) take the linear form
    (kernels.py mix_terms_linear: a division and a log per ratio, fast_div / fast_log on the GPU)
    for parameters >= 2^-60 (kd_math.h mix_linear_ok), the log-space form below that (down to
    2^-126 and 0). By the static model (benchmarks/gpu_model.py, sm_90a, bf16 training step) the
    linear form takes 108 SASS/elem for jsd against 128 in log space."""
    return int(div_id) in K.LINEAR_DIVS and float(param) >= 2.0 ** -60


def _modes(div_id, param, soft_weight, hard_weight, labels):
    return dict(DIV=int(div_id), LIN=_linear(div_id, param), SOFT=soft_weight != 0.0,
                HAS_LABELS=labels is not None, HARD=labels is not None and hard_weight != 0.0)


def forward_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], div_id: int,
                 param: float, temperature: float, soft_weight: float, hard_weight: float,
                 ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-row loss [N] fp32 and stats [N, STATS_WIDTH] fp32 (see kernels.py)."""
    _check(student, teacher, labels)
    if div_id == mse_launch.LOGIT_MSE:  # its own kernels (mse_kernels.py)
        return mse_launch.forward_rows(student, teacher, labels, soft_weight, hard_weight,
                                       ignore_index)
    Bn, L, V = student.shape
    N = Bn * L
    loss = torch.empty((N,), dtype=torch.float32, device=student.device)
    stats = torch.empty((N, STATS_WIDTH), dtype=torch.float32, device=student.device)
    if N == 0:
        return loss, stats
    _check_div(div_id)
    # labels of any stride: one copy of N int64 where strided (the kernel reads them at unit stride)
    lab = labels.contiguous() if labels is not None else loss  # any pointer without labels
    args = (student, teacher, lab, loss, stats, V, L, student.stride(0), student.stride(1),
            teacher.shape[1], teacher.stride(0), teacher.stride(1), 1.0 / temperature, float(param),
            soft_weight * temperature * temperature, hard_weight, ignore_index)
    modes = _modes(div_id, param, soft_weight, hard_weight, labels)
    with device_guard(student):
        if _autotune() and student.is_cuda:
            _tuned("fwd")[(N,)](*args, **modes)
        else:
            block, warps = _config("fwd", student.device, V)
            K.kd_fwd_kernel[(N,)](*args, **modes, BLOCK=block, num_warps=warps)
    return loss, stats


def backward_rows(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                  stats: Tensor, div_id: int, param: float, temperature: float,
                  soft_weight: float, hard_weight: float, ignore_index: int,
                  out: Optional[Tensor] = None) -> Tensor:
    """Gradient of Σ grad_loss·loss w.r.t. ``student``: a new contiguous [B, L, V] tensor, or
    ``out`` when given (``out=student`` overwrites the logits with their gradient)."""
    _check(student, teacher, labels)
    Bn, L, V = student.shape
    N = Bn * L
    if grad_loss.shape != (N,) or (N > 1 and grad_loss.stride(0) != 1):
        raise ValueError(f"grad_loss must be a contiguous [{N}] tensor, "
                         f"got {tuple(grad_loss.shape)}")
    if stats.shape != (N, STATS_WIDTH) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"stats must be a contiguous float32 [{N}, {STATS_WIDTH}] tensor")
    inplace = out is not None
    if out is None:
        out = torch.empty((Bn, L, V), dtype=student.dtype, device=student.device)
    elif out.shape != student.shape or out.dtype != student.dtype or \
            (V > 1 and out.stride(2) != 1) or out.device != student.device:
        raise ValueError("out must have the student's shape, dtype, device and unit column stride")
    if N == 0 or V == 0:
        return out
    if div_id == mse_launch.LOGIT_MSE:
        return mse_launch.backward_rows(grad_loss, student, teacher, labels, stats, soft_weight,
                                        hard_weight, ignore_index, out)
    _check_div(div_id)
    lab = labels.contiguous() if labels is not None else stats
    args = (student, teacher, lab, stats, grad_loss, out, V, L, student.stride(0),
            student.stride(1), teacher.shape[1], teacher.stride(0), teacher.stride(1),
            out.stride(0), out.stride(1),
            1.0 / temperature, float(param), soft_weight * temperature, hard_weight, ignore_index)
    modes = _modes(div_id, param, soft_weight, hard_weight, labels)
    with device_guard(student):
        if _autotune() and student.is_cuda:
            _tuned("bwd_inplace" if inplace and out.data_ptr() == student.data_ptr() else "bwd")[
                (N,)](*args, **modes)
        else:
            block, warps = _config("bwd", student.device, V)
            K.kd_bwd_kernel[(N,)](*args, **modes, BLOCK=block, num_warps=warps)
    return out


def forward_rows_given_stats(student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                             stats: Tensor, div_id: int, param: float, temperature: float,
                             ignore_index: int) -> Tensor:
    """[N, 2] fp32: per row Σφ and Σ q·g over the columns of ``student`` with the normalisers of
    ``stats`` (the kernel contract, ``kdkernels.backends``)."""
    _check(student, teacher, labels)
    check_given_stats_div(div_id, "triton")
    Bn, L, V = student.shape
    N = Bn * L
    out = torch.empty((N, 2), dtype=torch.float32, device=student.device)
    if stats.shape != (N, STATS_WIDTH) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"stats must be a contiguous float32 [{N}, {STATS_WIDTH}] tensor")
    if N == 0:
        return out
    _check_div(div_id)
    lab = labels.contiguous() if labels is not None else stats
    args = (student, teacher, lab, stats, out, V, L, student.stride(0), student.stride(1),
            teacher.shape[1], teacher.stride(0), teacher.stride(1), 1.0 / temperature,
            float(param), ignore_index)
    with device_guard(student):
        block, warps = _config("given", student.device, V)
        K.kd_given_stats_kernel[(N,)](*args, DIV=int(div_id), LIN=_linear(div_id, param),
                                      HAS_LABELS=labels is not None,
                                      BLOCK=block, num_warps=warps)
    return out


# ---- teacher ensembles ("ensemble": ensemble_kernels.py) -----------------------------------------

def _check_ensemble(student: Tensor, teachers, weights, labels: Optional[Tensor]) -> None:
    if not isinstance(teachers, (list, tuple)) or not teachers:
        raise TypeError("teachers must be a non-empty list of tensors")
    if len(weights) != len(teachers):
        raise ValueError(f"{len(weights)} weights for {len(teachers)} teachers")
    for t in teachers:
        _check(student, t, labels)


def _ensemble_args(student: Tensor, teachers, weights):
    """The teachers as the kernels take them: tuples of pointers, row splits and row strides,
    and the weights as an fp32 device tensor."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=student.device)
    return (tuple(teachers), tuple(t.shape[1] for t in teachers),
            tuple(t.stride(0) for t in teachers), tuple(t.stride(1) for t in teachers), w)


def _ensemble_stats(student, teachers, lab, stats, temperature, soft, hard, has_labels,
                    ignore_index):
    """The normalisers of every teacher and of the student (and of s at T = 1 for the hard term)
    into ``stats``: one lse_rows_kernel launch per tensor."""
    Bn, L, V = student.shape
    N = Bn * L
    W = stats.shape[1]
    k2 = 1.4426950408889634 / temperature
    block, warps = _config("lse", student.device, V)
    jobs = []
    if soft:
        jobs += [(t, 0 if m == 0 else 7 + 2 * (m - 1), k2) for m, t in enumerate(teachers)]
        jobs.append((student, 2, k2))
    if hard:
        jobs.append((student, 5, 1.4426950408889634))
    for x, col, k in jobs:
        EK.lse_rows_kernel[(N,)](x, lab, stats, W, col, V, x.shape[1], x.stride(0), x.stride(1),
                                 k, ignore_index, HAS_LABELS=has_labels, BLOCK=block,
                                 num_warps=warps)


def forward_rows_ensemble(student: Tensor, teachers, weights, labels: Optional[Tensor],
                          div_id: int, param: float, temperature: float, soft_weight: float,
                          hard_weight: float, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-row loss [N] and stats [N, 7 + 2(M - 1)] against p = Σ_m w_m softmax(t_m / T) (the
    kernel contract, ``kdkernels.backends``; stats layout in ensemble_kernels.py)."""
    _check_ensemble(student, teachers, weights, labels)
    Bn, L, V = student.shape
    N = Bn * L
    M = len(teachers)
    loss = torch.empty((N,), dtype=torch.float32, device=student.device)
    stats = torch.zeros((N, STATS_WIDTH + 2 * (M - 1)), dtype=torch.float32, device=student.device)
    if N == 0:
        return loss, stats
    _check_div(div_id)
    lab = labels.contiguous() if labels is not None else loss
    modes = _modes(div_id, param, soft_weight, hard_weight, labels)
    tp, tL, tsb, tsl, w = _ensemble_args(student, teachers, weights)
    with device_guard(student):
        _ensemble_stats(student, teachers, lab, stats, temperature, modes["SOFT"], modes["HARD"],
                        modes["HAS_LABELS"], ignore_index)
        block, warps = _config("ens_fwd", student.device, V)
        EK.ens_fwd_kernel[(N,)](student, tp, tL, tsb, tsl, w, lab, loss, stats, V, L,
                                student.stride(0), student.stride(1), 1.0 / temperature,
                                float(param), soft_weight * temperature * temperature,
                                hard_weight, ignore_index, M=M, **modes, BLOCK=block,
                                num_warps=warps)
    return loss, stats


def backward_rows_ensemble(grad_loss: Tensor, student: Tensor, teachers, weights,
                           labels: Optional[Tensor], stats: Tensor, div_id: int, param: float,
                           temperature: float, soft_weight: float, hard_weight: float,
                           ignore_index: int) -> Tensor:
    """Gradient of Σ grad_loss·loss w.r.t. ``student`` against the ensemble: a new contiguous
    [B, L, V] tensor."""
    _check_ensemble(student, teachers, weights, labels)
    Bn, L, V = student.shape
    N = Bn * L
    M = len(teachers)
    W = STATS_WIDTH + 2 * (M - 1)
    if grad_loss.shape != (N,) or (N > 1 and grad_loss.stride(0) != 1):
        raise ValueError(f"grad_loss must be a contiguous [{N}] tensor, "
                         f"got {tuple(grad_loss.shape)}")
    if stats.shape != (N, W) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"stats must be a contiguous float32 [{N}, {W}] tensor")
    out = torch.empty((Bn, L, V), dtype=student.dtype, device=student.device)
    if N == 0 or V == 0:
        return out
    _check_div(div_id)
    lab = labels.contiguous() if labels is not None else stats
    tp, tL, tsb, tsl, w = _ensemble_args(student, teachers, weights)
    with device_guard(student):
        block, warps = _config("ens_bwd", student.device, V)
        EK.ens_bwd_kernel[(N,)](student, tp, tL, tsb, tsl, w, lab, stats, grad_loss, out, V, L,
                                student.stride(0), student.stride(1), out.stride(0),
                                out.stride(1), 1.0 / temperature, float(param),
                                soft_weight * temperature, hard_weight, ignore_index, M=M,
                                **_modes(div_id, param, soft_weight, hard_weight, labels),
                                BLOCK=block, num_warps=warps)
    return out


def forward_rows_with_grad(student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                           div_id: int, param: float, temperature: float, soft_weight: float,
                           hard_weight: float, ignore_index: int,
                           grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The "fused_grad" capability: per-row losses [N] fp32 (as forward_rows) and
    G = grad_scale[i] · d loss_i / d student_i (as backward_rows with grad_loss = grad_scale; ones
    when None), a new contiguous [B, L, V] tensor in the student's dtype, from ONE kernel: the
    statistics pass (and for the mixture divergences the loss / c pass), then the gradient pass,
    the statistics kept in registers. logit_mse: its forward and backward kernels."""
    _check(student, teacher, labels)
    if div_id == mse_launch.LOGIT_MSE:
        return with_grad_by_two_kernels(forward_rows, backward_rows, student, teacher, labels,
                                        div_id, param, temperature, soft_weight, hard_weight,
                                        ignore_index, grad_scale)
    Bn, L, V = student.shape
    N = Bn * L
    loss = torch.empty((N,), dtype=torch.float32, device=student.device)
    grad = torch.empty((Bn, L, V), dtype=student.dtype, device=student.device)
    if grad_scale is not None:
        if not isinstance(grad_scale, Tensor) or grad_scale.shape != (N,) \
                or grad_scale.device != student.device:
            raise ValueError(f"grad_scale must be None or a [{N}] tensor on {student.device}")
        grad_scale = grad_scale.to(torch.float32).contiguous()
    if N == 0:
        return loss, grad
    _check_div(div_id)
    lab = labels.contiguous() if labels is not None else loss  # any pointer without labels
    gs = grad_scale if grad_scale is not None else loss
    args = (student, teacher, lab, gs, loss, grad, V, L, student.stride(0), student.stride(1),
            teacher.shape[1], teacher.stride(0), teacher.stride(1), grad.stride(0),
            grad.stride(1), 1.0 / temperature, float(param),
            soft_weight * temperature * temperature, soft_weight * temperature, hard_weight,
            ignore_index)
    modes = _modes(div_id, param, soft_weight, hard_weight, labels)
    block, warps = _config("fwd", student.device, V)
    gblock, _ = _config("bwd", student.device, V)
    with device_guard(student):
        K.kd_fwd_grad_kernel[(N,)](*args, **modes, HAS_SCALE=grad_scale is not None,
                                   BLOCK=block, GBLOCK=gblock, num_warps=warps)
    return loss, grad


def rescale_rows_(grad: Tensor, grad_loss: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    """In place: grad[b, l, :] *= grad_loss[r] / grad_scale[r] (r = b·L + l; grad_scale None:
    ones; 0 where grad_scale is 0), in fp32 rounded once, as ``ops.dense.scale_rows`` computes it
    out of place. Rows whose ratio is exactly 1 are not touched (no bytes moved): no host
    synchronisation is needed to skip the rescaling of a fused gradient. Returns ``grad``."""
    require_launchable(grad)
    if grad.dim() != 3 or (grad.shape[2] > 1 and grad.stride(2) != 1):
        raise ValueError("grad must be a [B, L, V] tensor with unit column stride")
    Bn, L, V = grad.shape
    N = Bn * L
    if N == 0 or V == 0:
        return grad
    gl = grad_loss.reshape(N).to(torch.float32).contiguous()
    gs = None if grad_scale is None else grad_scale.reshape(N).to(torch.float32).contiguous()
    block, warps = _RESCALE_CONFIG if grad.is_cuda else _INTERPRETER_CONFIG["bwd"]
    block = min(block, max(_MIN_BLOCK, triton.next_power_of_2(V)))
    with device_guard(grad):
        K.kd_rescale_kernel[(N,)](grad, gl, gs if gs is not None else gl, V, grad.stride(0),
                                  grad.stride(1), L, HAS_SCALE=gs is not None, BLOCK=block,
                                  num_warps=warps)
    return grad


def forward_rows_ensemble_with_grad(student: Tensor, teachers, weights, labels: Optional[Tensor],
                                    div_id: int, param: float, temperature: float,
                                    soft_weight: float, hard_weight: float, ignore_index: int,
                                    grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The losses and G = grad_scale·d loss / d student against the ensemble: the forward kernels
    then the backward one (no fused ensemble kernel yet)."""
    return ensemble_with_grad_by_two_kernels(
        forward_rows_ensemble, backward_rows_ensemble, student, teachers, weights, labels, div_id,
        param, temperature, soft_weight, hard_weight, ignore_index, grad_scale)
