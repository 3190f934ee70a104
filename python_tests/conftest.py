"""Shared test configuration: the Triton interpreter switch, dtype tolerances, backend fixtures.

Error bound (DESIGN.md §4.5): against the float64 oracle, a backend's error may be at most about
twice that of plain PyTorch computing the same formula in the input dtype, plus a small per-dtype
tolerance relative to the size of the expected values.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton (it is read when @triton.jit decorates).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # backend="cuda" on CPU tensors: the CUDA kernels under their host emulation
    # (kdkernels/backends/cuda_emulate.py; built on first use). KDKERNELS_CUDA_EMULATE=0 turns it off.
    os.environ.setdefault("KDKERNELS_CUDA_EMULATE", "1")

import pytest  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels import backends  # noqa: E402
from kdkernels.backends import cuda_emulate  # noqa: E402

# relative tolerance on max |actual - expected| / max |expected|, per input dtype
TOL = {
    torch.float64: 1e-9,
    torch.float32: 3e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}

# absolute floor, for expected values at or near zero (identical distributions, V = 1)
ATOL = {torch.float64: 1e-12, torch.float32: 1e-7, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def abs_err(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in float64, 0 where both are the same infinity."""
    a, e = actual.detach().double(), expected.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    return torch.where(both_inf, 0.0, (a - e).abs())


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = abs_err(actual, expected)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(actual, expected, dtype, plain=None, what="", scale_floor=0.0, abs_floor=0.0):
    """Three-way bound: err(actual) <= 2 * err(plain) + TOL[dtype] * scale + ATOL[dtype] + abs_floor.

    ``scale`` is max |expected|, or ``scale_floor`` when larger: for results that cancel to ~0
    (ties p == q, identical rows), rounding error is relative to the size of the terms that
    cancel, not to their ~0 difference, and the caller states that size. ``abs_floor`` is a
    caller-derived absolute allowance (a few fp32 ulps of the quantities that cancel, see
    test_fuzz._fp32_sizes): a number, or a tensor broadcastable to ``actual`` (per row), in which
    case each element is held to its own allowance."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not torch.isnan(actual).any() or torch.isnan(expected).any(), f"{what}: NaN in output"
    finite = torch.isfinite(expected.double())
    scale = float(expected.double()[finite].abs().max()) if finite.any() else 1.0
    scale = max(scale, scale_floor)
    bound = TOL[dtype] * scale + ATOL[dtype]
    if plain is not None:
        bound += 2.0 * max_err(plain, expected)
    diff = abs_err(actual, expected)
    if not diff.numel():
        return 0.0
    floor = torch.as_tensor(abs_floor, dtype=torch.float64).expand_as(diff)
    over = diff - floor  # error beyond each element's allowance
    err, worst = float(over.max()), int(over.argmax())
    floor_w = float(floor.reshape(-1)[worst])
    assert err <= bound, (f"{what}: max error {float(diff.reshape(-1)[worst]):.3e} > bound "
                          f"{bound + floor_w:.3e} (scale {scale:.3e})")
    return float(diff.max())


def cuda_emulated() -> bool:
    """True when backend="cuda" runs here on CPU tensors, under the host emulation."""
    return not torch.cuda.is_available() and cuda_emulate.unavailable_reason() is None


def backend_params(*names):
    """pytest params for backends, skipped with the reason where one cannot run here. Without a
    GPU, "cuda" runs on CPU tensors under the host emulation when KDKERNELS_CUDA_EMULATE=1."""
    out = []
    for name in names or backends.names():
        reason = backends.availability(name)
        if name == "cuda" and not torch.cuda.is_available():
            reason = cuda_emulate.unavailable_reason()
        marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
