"""The CUDA kernels (csrc/cuda/kd_cuda.cu) executed on the CPU under the host emulation of the CUDA
execution model (csrc/testing/cuda_emu.h, kdkernels/backends/cuda_emulate.py), against the float64 oracle.

conftest.py sets KDKERNELS_CUDA_EMULATE=1 on machines without a GPU, so CI runs these; the
extension is built on first use (about half a minute). Every case goes through the public API
with backend="cuda" on CPU tensors, forward and backward, and is checked by test_fuzz._check_case
(the fuzzer's bound: at most about twice plain PyTorch's fp32 error, plus a few ulps of the terms
that cancel).
"""
import os
import sys

import pytest
import torch

import kdkernels as kd
from kdkernels import backends, divergences
from kdkernels.backends import cuda_emulate

import oracle
import test_fuzz
from conftest import assert_close, cuda_emulated

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_model as G  # noqa: E402  (cluster_size: the launcher's rule, as the model reads it)

pytestmark = pytest.mark.skipif(not cuda_emulated(), reason=(
    "a CUDA GPU is present (test_cuda_backend.py runs the real kernels)" if torch.cuda.is_available()
    else f"CUDA emulation unavailable: {cuda_emulate.unavailable_reason()}"))

DIVS = divergences.kernel_names()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARAM = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def case(div, dtype, V, T=2.0, lead=(2, 3), pattern="randn", strided=False, pad=0, mask="some",
         hard=0.5, seed=0):
    return (div, PARAM.get(div, {}), T, V, lead, dtype, pattern, strided, pad, mask, hard, seed)


# V: 1, 7 (under one vector), 1271 and 5003 (not multiples of any vector width), 50257-like.
# Odd V in bf16/fp16 and the strided views start rows off 16-byte boundaries (peeled heads);
# pad > 0 (teacher wider than the student) gives the teacher another alignment than the student.
@pytest.mark.parametrize("V", [1, 7, 1271, 5003])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_matrix_labels_hard_term(div, dtype, V):
    test_fuzz._check_case("cuda", case(div, dtype, V, strided=V % 2 == 1, pad=3 if V > 7 else 0,
                                       seed=V))


# (pattern, T, V, mask, hard): -inf columns, |logits| ~ 1e4 at T = 0.05, one-hot teachers, exact
# ties, all rows ignored, soft term only, T = 1 with the hard term (its statistics shared with the
# student's).
PATTERNS = [("neginf", 2.0, 1271, "some", 0.5),
            ("huge", 0.05, 127, "some", 0.5),
            ("onehot", 0.05, 300, "none", 0.0),
            ("ties", 0.05, 77, "none", 0.0),
            ("randn", 1.0, 333, "all", 0.5),
            ("randn", 0.7, 1000, "none", 0.0),
            ("randn", 1.0, 999, "some", 0.5)]


def check_patterns(div, dtype, patterns, pad):
    for pattern, T, V, mask, hard in patterns:
        test_fuzz._check_case("cuda", case(div, dtype, V, T=T, pattern=pattern, mask=mask,
                                           hard=hard, strided=True, pad=pad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_patterns(div, dtype):
    """PATTERNS on strided views with a teacher 64 columns wider."""
    check_patterns(div, dtype, PATTERNS, pad=64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_vocabulary_50257(div, dtype):
    test_fuzz._check_case("cuda", case(div, dtype, 50257, lead=(2,), strided=True, seed=3))


@pytest.mark.parametrize("div", DIVS)
def test_forward_only_and_hard_only(div):
    """Forward without autograd (the two-kernel path's first kernel alone), and the hard term
    alone (soft_weight = 0: the kernels without the soft term)."""
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(3, 4, 1271, generator=g) * 3).bfloat16()
    t = (torch.randn(3, 4, 1300, generator=g) * 3).bfloat16()[..., 1:]  # wider, offset teacher
    labels = torch.randint(0, 1271, (3, 4), generator=g)
    labels[0, 2] = -100
    kw = dict(temperature=1.5, labels=labels, hard_weight=0.5, reduction="none", **PARAM.get(div, {}))
    with torch.no_grad():
        out = kd.kd_loss(s, t, div, backend="cuda", **kw)
    okw = dict(divergence_name=div, **kw)
    exp, _ = oracle.loss_and_grad(s, t, **okw)
    plain, _ = oracle.loss_and_grad(s, t, dtype=torch.float32, **okw)
    assert_close(out, exp, torch.bfloat16, plain=plain, what="forward only")
    x = s.clone().requires_grad_(True)
    kw["soft_weight"] = 0.0
    out = kd.kd_loss(x, t, div, backend="cuda", **kw)
    out.sum().backward()
    okw = dict(divergence_name=div, **kw)
    exp, eg = oracle.loss_and_grad(s, t, **okw)
    plain, pg = oracle.loss_and_grad(s, t, dtype=torch.float32, **okw)
    assert_close(out.detach(), exp, torch.bfloat16, plain=plain, what="hard only loss")
    assert_close(x.grad, eg, torch.bfloat16, plain=pg, what="hard only grad")
    assert (x.grad[0, 2] == 0).all()


def test_close_to_the_cpu_kernels():
    """Same inputs through backend='cuda' (emulated) and 'cpu': same math (kd_math.h), different
    summation order, so close but not bitwise; both ignore the same rows exactly."""
    s, t = torch.randn(5, 2049), torch.randn(5, 2049)
    labels = torch.tensor([1, -100, 3, 4, -100])
    a = kd.kd_loss(s, t, "jsd", labels=labels, hard_weight=0.3, reduction="none", backend="cuda")
    b = kd.kd_loss(s, t, "jsd", labels=labels, hard_weight=0.3, reduction="none", backend="cpu")
    assert a[1] == 0 and a[4] == 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_threads_mode(monkeypatch):
    """Each CUDA thread an OS thread (the ThreadSanitizer mode): same results as the fibers."""
    s, t = torch.randn(2, 3001).bfloat16(), torch.randn(2, 3001).bfloat16()
    fib = kd.kd_loss(s, t, "tvd", reduction="none", backend="cuda")
    monkeypatch.setenv("KDKERNELS_CUDA_EMULATE_MODE", "threads")
    thr = kd.kd_loss(s, t, "tvd", reduction="none", backend="cuda")
    assert torch.equal(fib, thr)


def test_pending_error_is_not_this_launchs():
    """An error left pending by an earlier, unrelated CUDA call is not reported as the launch's
    own (the launcher clears it first)."""
    cuda_emulate.set_pending_error(1)  # cudaErrorInvalidValue, as from an unrelated call
    out = kd.kd_loss(torch.randn(2, 10), torch.randn(2, 10), backend="cuda")
    assert torch.isfinite(out)


def test_cuda_on_cpu_needs_the_variable(monkeypatch):
    monkeypatch.delenv("KDKERNELS_CUDA_EMULATE", raising=False)
    with pytest.raises(ValueError, match="KDKERNELS_CUDA_EMULATE=1"):
        kd.kd_loss(torch.randn(2, 10), torch.randn(2, 10), backend="cuda")
    monkeypatch.setenv("KDKERNELS_CUDA_EMULATE", "0")
    with pytest.raises(ValueError, match="backend='cuda'"):
        kd.kd_loss(torch.randn(2, 10), torch.randn(2, 10), backend="cuda")


def test_never_chosen_by_auto():
    assert os.environ.get("KDKERNELS_CUDA_EMULATE") == "1"
    for dtype in DTYPES:
        assert backends.choose("auto", torch.device("cpu"), dtype) != "cuda"
    assert backends.choose("cuda", torch.device("cpu"), torch.float32) == "cuda"
    assert backends.load("cuda") is cuda_emulate


# ---- the training step's two kernels: cluster_grad_kernel (the row on chip) and forward_grad_kernel
# kd_cuda.cu launch_cluster_grad: C = the smallest power of two <= 16 whose slices fit the budget,
# by benchmarks/gpu_model.py's copy of the rule (which these tests hold to the launcher's).
def cluster_size(V, dtype, budget):
    return G.cluster_size(V, torch.empty((), dtype=dtype).element_size(), budget)[0]


def fused_ctas(s, t, labels, div, soft_weight=1.0):
    """CTAs the fused training-step op ran on rows [N, V], and its (loss [N], grad [N, V])."""
    c0 = cuda_emulate.counters()
    out = cuda_emulate.forward_rows_with_grad(s[None], t[None], labels,
                                              divergences.DIVERGENCES[div].id,
                                              next(iter(PARAM.get(div, {"x": 0.0}).values())),
                                              2.0, soft_weight, 0.5, -100)
    return cuda_emulate.counters()[1] - c0[1], (out[0].reshape(-1), out[1].reshape(s.shape))


@pytest.mark.parametrize("div", DIVS)
def test_cluster_sizes_and_fallbacks(div, monkeypatch):
    """The launcher's choice, read off the CTAs run: clusters of 1 to 16 CTAs per row as the
    budget shrinks, forward_grad_kernel (one CTA per row) with the budget 0, on an emulated sm_80,
    without the soft term, or when no cluster fits; every choice the same loss and gradient to
    fp32 rounding (only the summation tree differs)."""
    g = torch.Generator().manual_seed(5)
    N, V = 3, 5003
    s = (torch.randn(N, V, generator=g) * 3).bfloat16()
    t = (torch.randn(N, V, generator=g) * 3).bfloat16()
    labels = torch.tensor([4, -100, 5002])
    monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", "0")
    n, (ref_loss, ref_grad) = fused_ctas(s, t, labels, div)
    assert n == N
    seen = set()
    for budget in (73728, 20000, 10000, 5000, 2500, 1700, 1000):
        monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", str(budget))
        C = cluster_size(V, torch.bfloat16, budget)
        n, (loss, grad) = fused_ctas(s, t, labels, div)
        assert n == N * (C or 1), (budget, C, n)
        seen.add(C)
        torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1.6e-2, atol=1e-6)
        assert (grad[1] == 0).all() and loss[1] == 0
    assert seen == {1, 2, 4, 8, 16, 0}, seen
    monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", "2500")
    monkeypatch.setenv("KDKERNELS_CUDA_EMULATE_SM", "80")
    assert fused_ctas(s, t, labels, div)[0] == N
    monkeypatch.setenv("KDKERNELS_CUDA_EMULATE_SM", "90")
    assert fused_ctas(s, t, labels, div, soft_weight=0.0)[0] == N


@pytest.mark.parametrize("budget", ["0", "1000"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_training_step_both_kernels(div, dtype, budget, monkeypatch):
    """Both training-step kernels against the oracle: forward_grad_kernel (budget 0) and
    cluster_grad_kernel in clusters of 8 or 16 CTAs (1000 bytes a CTA), on odd V, strided views,
    peeled heads, a teacher of another alignment, ignored rows, PATTERNS."""
    monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", budget)
    check_patterns(div, dtype, [("randn", 2.0, 1271, "some", 0.5)] + PATTERNS, pad=3)


def test_cluster_threads_mode(monkeypatch):
    """Clusters with every CUDA thread an OS thread (the ThreadSanitizer mode): the fibers' results."""
    monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", "1000")
    s, t = torch.randn(2, 1001).bfloat16(), torch.randn(2, 1001).bfloat16()
    fib = fused_ctas(s, t, None, "jsd")
    monkeypatch.setenv("KDKERNELS_CUDA_EMULATE_MODE", "threads")
    thr = fused_ctas(s, t, None, "jsd")
    assert fib[0] == thr[0] == 2 * cluster_size(1001, torch.bfloat16, 1000)
    assert torch.equal(fib[1][0], thr[1][0]) and torch.equal(fib[1][1], thr[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_cluster_maxima_from_the_copy_nan_and_neginf(div, dtype, monkeypatch):
    """cluster_grad_kernel takes the row's maxima while it copies the slices (RawMax),
    forward_grad_kernel in its statistics pass (fmaxf / raise_max): a row of -inf but one column,
    a row whose maxima sit in the last (tail) chunk, an ignored row give the same values (to
    rounding) in both kernels; rows with a NaN in s or in t and an all-NaN student row the same
    NaN pattern in loss and gradient (the sums carry a NaN over the row in both, whatever the
    maxima make of it)."""
    V = 1001
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, V, generator=g) * 3).to(dtype)
    t = (torch.randn(6, V, generator=g) * 3).to(dtype)
    s[0, 17] = float("nan")
    t[1, 500] = float("nan")
    s[2, :] = float("-inf")
    s[2, 3] = 1.0
    t[3, -1] = 40.0
    s[3, -2] = 30.0
    s[4, :] = float("nan")
    labels = torch.tensor([5, 6, 3, V - 1, 0, -100])
    out = {}
    for budget in ("0", "1000"):
        monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", budget)
        n, out[budget] = fused_ctas(s, t, labels, div)
        assert n == 6 * (cluster_size(V, dtype, int(budget)) or 1)
    (l0, g0), (l1, g1) = out["0"], out["1000"]
    assert torch.equal(l0.isnan(), l1.isnan()) and torch.equal(g0.isnan(), g1.isnan())
    assert not l0[[3, 5]].isnan().any() and not g0[3].isnan().any() and (g0[5] == 0).all()
    ok = ~l0.isnan()
    torch.testing.assert_close(l1[ok], l0[ok], rtol=2e-5, atol=1e-5)
    ok = ~g0.isnan()
    torch.testing.assert_close(g1.float()[ok], g0.float()[ok], rtol=1.6e-2, atol=1e-6)


def test_cluster_ab_benchmark_runs(tmp_path, monkeypatch):
    """benchmarks/cuda_cluster_ab.py (gpu_suite.sh step cluster-ab) end to end, tiny: both kernels
    timed, the table written, the kernel choice left as it was (the cluster default)."""
    import cuda_cluster_ab as ab
    monkeypatch.delenv("KDKERNELS_CUDA_CLUSTER_BYTES", raising=False)
    out = tmp_path / "ab.txt"
    assert ab.main(["--N", "2", "--V", "37", "--rounds", "1", "--divergence", "tvd", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("card: cpu (CUDA host emulation)") and "N=2 V=37" in lines[0], lines
    assert lines[1].startswith("| divergence | cluster ms | 1cta ms |"), lines
    row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row[0] == "tvd" and float(row[1]) > 0 and float(row[2]) > 0, row
    assert "KDKERNELS_CUDA_CLUSTER_BYTES" not in os.environ
    with pytest.raises(ValueError, match="--rounds"):
        ab.main(["--rounds", "0"])
