"""Shared test configuration: the Triton interpreter switch, dtype tolerances, backend fixtures.

Error bound (DESIGN.md §4.5): against the float64 oracle, a backend's error may be at most about
twice that of plain PyTorch computing the same formula in the input dtype, plus a small per-dtype
tolerance relative to the size of the expected values.
"""
import os
import sys

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


# ---- devices: every backend test takes its tensors' device from the backend --------------------

SIMULATE_GPU = os.environ.get("KDKERNELS_SIMULATE_GPU") == "1"
if SIMULATE_GPU and "--collect-only" in sys.argv:
    # collection only (nothing runs): module-level torch.cuda.is_available() checks in the test
    # files see a GPU, so their skip marks are those of a GPU machine
    torch.cuda.is_available = lambda: True
GPU = torch.cuda.is_available()
_GPU_BACKENDS = ("triton", "cuda")


def device_for(backend: str) -> torch.device:
    """The device a test hands to ``backend``: CUDA for triton / cuda on a machine with a GPU
    (a compiled Triton launch never sees CPU tensors), CPU otherwise (the Triton interpreter, the
    C++ CPU kernels, the reference)."""
    return torch.device("cuda") if GPU and backend in _GPU_BACKENDS else torch.device("cpu")


def on(backend: str, *xs):
    """``xs`` moved to ``device_for(backend)`` (None and non-tensors unchanged); one value for one
    argument, else a tuple."""
    dev = device_for(backend)
    out = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in xs)
    return out[0] if len(out) == 1 else out


def kw_on(backend: str, kw: dict) -> dict:
    """A copy of the keyword arguments ``kw`` with its tensors moved to ``device_for(backend)``."""
    return {k: on(backend, v) for k, v in kw.items()}


def cpu(x):
    """A result back on the CPU, for comparison with the (CPU, float64) oracle."""
    return x.cpu() if isinstance(x, torch.Tensor) else x


# The device the bench picks by default (python -m kdkernels bench): CUDA when present.
BENCH_DEVICE = "cuda" if GPU else "cpu"


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


# ---- the collection-time guard ------------------------------------------------------------------
# On a machine with a GPU (or with KDKERNELS_SIMULATE_GPU=1, which pretends there is one for a
# collection run: ``KDKERNELS_SIMULATE_GPU=1 python -m pytest python_tests --collect-only -q``), a
# test parametrized with backend="triton" or "cuda" must take its device from ``device_for`` (or
# ``on``); a module that never does is a module whose tensors stay on the CPU, and collection
# fails naming it. At run time the launchers refuse CPU tensors without the interpreter
# (kdkernels.backends.triton.require_launchable; test_device_guard.py proves it in a subprocess).
_DEVICE_HELPERS = ("device_for", "on(", "kw_on(", "BENCH_DEVICE")


def _gpu_backend_of(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    b = callspec.params.get("backend")
    return b if b in _GPU_BACKENDS else None


def pytest_collection_modifyitems(config, items):
    if not (GPU or SIMULATE_GPU):
        return
    offenders, counts = {}, {}
    for item in items:
        path = str(item.fspath)
        if _gpu_backend_of(item):
            src = item.module.__file__ if getattr(item, "module", None) else path
            with open(src) as f:
                text = f.read()
            if not any(h in text for h in _DEVICE_HELPERS):
                offenders.setdefault(os.path.basename(src), []).append(item.nodeid)
        if SIMULATE_GPU:
            counts.setdefault(os.path.basename(path), [0, 0])[0 if _would_run(item) else 1] += 1
    if offenders:
        raise pytest.UsageError(
            "tests hand backend='triton'/'cuda' tensors that never leave the CPU (use "
            "conftest.device_for / on): " + "; ".join(f"{m}: {len(v)} tests" for m, v in
                                                      sorted(offenders.items())))
    if SIMULATE_GPU:
        config._kd_simulated_counts = counts


def _would_run(item) -> bool:
    """Whether ``item`` would run on a GPU machine: no skip mark, no skipif mark whose condition
    holds (conditions are evaluated with the simulated GPU), and for backend params, the backend
    would be available there (triton and cuda are, given the CUDA build)."""
    for m in item.iter_markers("skip"):
        reason = str(m.kwargs.get("reason", m.args[0] if m.args else ""))
        if SIMULATE_GPU and ("unavailable" in reason and any(f"'{b}'" in reason
                                                             for b in _GPU_BACKENDS)):
            continue  # skipped here only because this machine has no GPU
        return False
    for m in item.iter_markers("skipif"):
        if m.args and all(bool(c) for c in m.args if not isinstance(c, str)):
            return False
    return True


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = getattr(config, "_kd_simulated_counts", None)
    if not counts:
        return
    tr = terminalreporter
    tr.section("tests that would run on a GPU machine (KDKERNELS_SIMULATE_GPU=1, static marks)")
    total = [0, 0]
    for name in sorted(counts):
        run, skip = counts[name]
        total[0] += run
        total[1] += skip
        tr.write_line(f"{name:32s} run {run:5d}   skipped {skip:5d}")
    tr.write_line(f"{'total':32s} run {total[0]:5d}   skipped {total[1]:5d}")
