"""Triton backend of kdkernels: ``kernels.py`` and ``sparse_kernels.py`` hold the @triton.jit
kernels, ``launch.py`` the launchers implementing the backend contract of ``kdkernels.backends``
(dense and sparse), ``aot.py`` the ahead-of-time compile check for sm_80 / sm_90.

This file imports nothing heavy: the backend table asks it whether the interpreter is on."""
import os

INTERPRETER_HINT = ("set TRITON_INTERPRET=1 before importing triton to run the kernels in the "
                    "Triton interpreter on CPU tensors, for testing")


def interpreting() -> bool:
    """True when the Triton interpreter runs the kernels (on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
