"""pytest-benchmark microbenchmarks (not part of the default ``python_tests`` run).

Run from the repository root: ``python -m pytest benchmarks -q`` (add ``--benchmark-only`` to
skip the correctness-only parts, ``--benchmark-json=out.json`` to keep the numbers).
Implementations come from ``kdkernels.tools.bench.implementations()``, the same registry the CLI
uses, so a backend merged later appears here without edits.
"""
import pytest
import torch

from kdkernels.tools import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small shapes: each case runs in a fraction of a second on a 2-core CPU
N, V = (32, 2048) if DEVICE == "cpu" else (1024, 32000)


def impl_params(divergence, dtype="float32", with_divergence=False, exclude=()):
    """One pytest param per implementation (``(divergence, name)`` pairs with
    ``with_divergence``), skipped with the harness's reason where it cannot run this problem."""
    p = bench.Problem(divergence, dtype, N, V, DEVICE)
    out = []
    for name, impl in bench.implementations().items():
        if name in exclude:
            continue
        reason = impl.unavailable(p)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        values = (divergence, name) if with_divergence else (name,)
        out.append(pytest.param(*values, marks=marks,
                                id=f"{divergence}-{name}" if with_divergence else name))
    return out


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
