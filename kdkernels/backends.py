"""Backend registry: which implementations exist, where they run, and why one is unavailable.

Every backend is a module with the same three names (the kernel contract):

``forward_rows(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
ignore_index) -> (loss [N], stats [N, STATS_WIDTH])``
    ``student`` is a [B, L, V] view with unit column stride and any row strides (B·L = N rows);
    ``teacher`` is a [B, L, Vt >= V] view of the same kind (columns >= V are ignored);
    ``labels`` is None or an int64 [N] contiguous tensor. ``loss`` is per-row
    soft_weight·T²·D + hard_weight·CE in fp32 (float64 for float64 inputs), 0 on ignored rows.
    ``stats`` is backend-private per-row fp32 state handed to backward.
``backward_rows(grad_loss [N], student, teacher, labels, stats, <same scalars>) -> grad``
    The gradient of Σ grad_loss[i]·loss[i] w.r.t. ``student``, a new contiguous [B, L, V] tensor in
    the student's dtype; exactly zero on ignored rows.
``STATS_WIDTH``
    Columns of ``stats``.

Kernels never reduce over rows; reductions live in ``functional.py``. The ``reference`` backend
is the exception to the contract: it is plain differentiable PyTorch (``reference.loss_rows``) and
needs no custom op.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

__all__ = ["BACKENDS", "FEATURES", "availability", "load", "choose", "names"]

# Optional capabilities beyond the kernel contract. A call that needs one only runs on a backend
# listing it: backend="auto" skips the others, an explicit backend without it is an error.
#   "logit_mse"    the logit_mse divergence (divergences.DIVERGENCES[...].feature)
#   "ensemble"     several teachers, p = sum_m w_m softmax(t_m / T)
#   "teacher_grad" the gradient with respect to the teacher logits (online/mutual distillation)
FEATURES = frozenset({"logit_mse", "ensemble", "teacher_grad"})

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str                         # import path of the module implementing the contract
    devices: Tuple[str, ...]            # device types it runs on
    dtypes: Tuple[torch.dtype, ...]     # input dtypes it accepts
    stats_width: int
    probe: Optional[Callable[[], Optional[str]]] = None  # returns a reason when unavailable
    features: frozenset = frozenset()   # optional capabilities it implements (FEATURES)


def _probe_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run the kernels " \
               "in the Triton interpreter on CPU tensors, for testing)"
    return None


def _probe_ext(device: str) -> Callable[[], Optional[str]]:
    def probe() -> Optional[str]:
        try:
            from . import cpp
        except Exception as e:
            return f"the compiled extension could not be loaded ({type(e).__name__}: {e})"
        return cpp.unavailable_reason(device)
    return probe


BACKENDS = {
    b.name: b
    for b in (
        BackendSpec("reference", "kdkernels.reference", ("cpu", "cuda", "mps", "xpu", "meta"),
                    _FLOATS + (torch.float64,), 0,  # differentiable loss_rows, no custom op
                    features=FEATURES),
        BackendSpec("triton", "kdkernels.triton.launch", ("cuda", "cpu"), _FLOATS, 7, _probe_triton),
        BackendSpec("cuda", "kdkernels.cpp", ("cuda",), _FLOATS, 7, _probe_ext("cuda")),
        BackendSpec("cpu", "kdkernels.cpp", ("cpu",), _FLOATS, 7, _probe_ext("cpu")),
    )
}
# backend="auto": first available in this order for the tensors' device type
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def names() -> list:
    return list(BACKENDS)


_AVAILABILITY = {}


@torch.compiler.assume_constant_result
def availability(name: str) -> Optional[str]:
    """None if backend ``name`` can run on this machine, else the reason it cannot (cached: a
    constant for torch.compile, probed once per process)."""
    if name not in _AVAILABILITY:
        _AVAILABILITY[name] = _probe(name)
    return _AVAILABILITY[name]


def _probe(name: str) -> Optional[str]:
    spec = BACKENDS[name]
    if spec.probe is not None:
        reason = spec.probe()
        if reason:
            return reason
    try:
        importlib.import_module(spec.module)
    except Exception as e:
        return f"{spec.module} failed to import ({type(e).__name__}: {e})"
    return None


def load(name: str):
    if name == "cuda" and os.environ.get("KDKERNELS_CUDA_EMULATE") == "1":  # kdkernels.cuda_emulate
        return importlib.import_module("kdkernels.cuda_emulate")  # CPU tensors emulated, CUDA real
    return importlib.import_module(BACKENDS[name].module)


def choose(backend: str, device: torch.device, dtype: torch.dtype,
           needs: frozenset = frozenset()) -> str:
    """Resolve ``backend`` ("auto" or a name) for tensors on ``device`` of ``dtype``.

    ``needs``: features (``FEATURES``) the call requires. "auto" skips backends without them
    (ultimately the reference has all); a named backend without them is an error."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if dtype == torch.float64:
            return "reference"  # kernels compute in fp32; float64 is for oracles and gradcheck
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            spec = BACKENDS[name]
            if device.type == "cpu" and name == "triton":
                continue  # never launch the interpreter unless asked for by name
            if not needs <= spec.features:
                continue  # this backend would not compute what the call asks for
            if dtype in spec.dtypes and availability(name) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; expected 'auto' or one of {names()}")
    spec = BACKENDS[backend]
    emulated = backend == "cuda" and device.type == "cpu"  # kdkernels.cuda_emulate (test tool)
    if emulated:
        importlib.import_module("kdkernels.cuda_emulate").require()
    elif device.type not in spec.devices:
        raise ValueError(f"backend={backend!r} does not run on {device.type} tensors "
                         f"(it runs on: {', '.join(spec.devices)})")
    if dtype not in spec.dtypes:
        raise TypeError(f"backend={backend!r} does not accept {dtype} logits "
                        f"(it accepts: {', '.join(str(d) for d in spec.dtypes)})")
    missing = sorted(needs - spec.features)
    if missing:
        have = ", ".join(sorted(spec.features)) or "none"
        raise ValueError(f"backend={backend!r} does not support {', '.join(missing)} (needed by "
                         f"this call; its optional features: {have}); use backend='reference' or "
                         f"backend='auto'")
    reason = None if emulated else availability(backend)
    if reason:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "(set before importing triton)")
    return backend
