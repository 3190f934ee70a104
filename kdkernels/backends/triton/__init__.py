"""Triton backend of kdkernels: ``kernels.py`` and ``sparse_kernels.py`` hold the @triton.jit
kernels, ``launch.py`` the launchers implementing the backend contract of ``kdkernels.backends``
(dense and sparse), ``aot.py`` the ahead-of-time compile check for sm_80 / sm_90.

This file imports nothing heavy: the backend table asks it whether the interpreter is on."""
import contextlib
import os

INTERPRETER_HINT = ("set TRITON_INTERPRET=1 before importing triton to run the kernels in the "
                    "Triton interpreter on CPU tensors, for testing")


def interpreting() -> bool:
    """True when the Triton interpreter runs the kernels (on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_guard(x):
    """``torch.cuda.device(x.device)`` for a CUDA tensor (a launch on tensors of ``cuda:1`` while
    device 0 is current must run on device 1), a no-op context for CPU tensors (interpreter)."""
    import torch
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def require_launchable(x, what="the triton backend"):
    """Raise unless a Triton launch on ``x`` can run: CUDA tensors, or CPU tensors under the
    interpreter. Without this a CPU tensor would reach a compiled launch (``0 active drivers``, or
    a GPU kernel dereferencing host pointers)."""
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{what} runs on CPU tensors only in the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before importing triton)")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{what} runs on cuda tensors, got {x.device}")
