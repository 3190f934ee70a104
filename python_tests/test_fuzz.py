"""Differential fuzzer: every backend available here against the float64 oracle.

Profiles (environment variable KDKERNELS_FUZZ): "short" (default, runs in CI: a few dozen cases
per backend) and "long" (>= 10,000 cases per backend, on demand:
``KDKERNELS_FUZZ=long python -m pytest python_tests/test_fuzz.py -q -p no:randomly``).
Every failure it finds becomes a named test in test_regressions.py.

Inputs are drawn to be ugly: divergence and parameter, temperature 0.05–50, V from 1 up to 70000
(smaller for the Triton interpreter, whose cost is per block operation), leading dims and strided
views, fp32/bf16/fp16, masks (including all rows ignored), and row patterns: identical rows,
one-hot-like teachers, exact ties p == q, −inf columns shared by teacher and student, ±1e4
logits, and logits spread so that probabilities fall into the denormal range.

The bound is conftest.assert_close with "plain" = the same formula evaluated by PyTorch in float32
on the same (rounded) inputs: a kernel that accumulates in fp32 must be about as good as that,
whatever its input dtype (this catches e.g. rounding logits to bf16 after scaling by 1/T).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdkernels as kd
from kdkernels import backends
from kdkernels import divergences as D
from conftest import GPU, assert_close, backend_params, cpu, cuda_emulated, device_for, on
import oracle

PROFILE = os.environ.get("KDKERNELS_FUZZ", "short")
EXAMPLES = {"short": 25, "long": 10_000}[PROFILE]
MAX_V = {"reference": 70_000, "cpu": 70_000, "cuda": 70_000, "triton": 70_000}
if os.environ.get("TRITON_INTERPRET") == "1":
    MAX_V["triton"] = 3_000
if PROFILE == "short":
    MAX_V = {k: min(v, 6_000) for k, v in MAX_V.items()}

PATTERNS = ["randn", "identical", "onehot", "ties", "neginf", "huge", "denormal"]


def _kernel_divergences():
    return getattr(D, "kernel_names", D.names)()


@st.composite
def cases(draw, backend):
    div = draw(st.sampled_from(_kernel_divergences()))
    param = {}
    if div == "jsd":
        param["beta"] = draw(st.sampled_from([0.01, 0.1, 0.5, 0.9, 0.99]) | st.floats(0.01, 0.99))
    elif div.startswith("skew"):
        # the admissible domain: 0, or fp32-representable (divergences.FP32_TINY)
        param["alpha"] = draw(st.sampled_from([0.0, 1e-30, 0.1, 0.5, 0.9])
                              | st.floats(D.FP32_TINY, 0.95))
    T = draw(st.sampled_from([0.05, 0.5, 1.0, 2.0, 50.0]) | st.floats(0.05, 50.0))
    V = draw(st.sampled_from([1, 2, 7, 127, 1271]) | st.integers(1, MAX_V[backend]))
    lead = draw(st.sampled_from([(3,), (2, 3), (1, 4), (2, 2, 2)]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    pattern = draw(st.sampled_from(PATTERNS))
    strided = draw(st.booleans())
    pad = draw(st.sampled_from([0, 0, 3, 64]))
    mask = draw(st.sampled_from(["none", "some", "all"]))
    hard = draw(st.sampled_from([0.0, 0.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    return div, param, T, V, lead, dtype, pattern, strided, pad, mask, hard, seed


def _make(V, lead, dtype, pattern, strided, pad, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead[:-1], lead[-1] + (1 if strided else 0))
    s = torch.randn(*shape, V, generator=g) * 3
    t = torch.randn(*shape, V + pad, generator=g) * 3
    if pattern == "identical":
        t[..., :V] = s
    elif pattern == "onehot":
        t.fill_(-1e4)
        idx = torch.randint(0, V, shape, generator=g)
        t.scatter_(-1, idx.unsqueeze(-1), 1e4)
    elif pattern == "ties":  # p == q exactly in some columns: both rows equal up to a shift
        t[..., :V] = s + 1.5
    elif pattern == "neginf" and V > 1:
        cols = torch.randperm(V, generator=g)[: max(1, V // 4)]
        s[..., cols] = float("-inf")
        t[..., cols] = float("-inf")
    elif pattern == "huge":
        s = s.sign() * 1e4 * torch.rand(s.shape, generator=g)
        t = t.sign() * 1e4 * torch.rand(t.shape, generator=g)
    elif pattern == "denormal":  # log-probabilities around -90..-105: exp() lands in denormals
        s = -90.0 - 15.0 * torch.rand(s.shape, generator=g)
        t = -90.0 - 15.0 * torch.rand(t.shape, generator=g)
        s[..., 0] = 0.0
        t[..., 0] = 0.0
    if dtype == torch.float16:
        s, t = s.clamp(-6e4, 6e4), t.clamp(-6e4, 6e4)
    s, t = s.to(dtype).to(device), t.to(dtype).to(device)
    if strided:  # sequence-shifted views: s[..., :-1, :], t[..., 1:, :]
        s, t = s[..., :-1, :], t[..., 1:, :]
    return s, t


def _labels(s, mask, seed):
    g = torch.Generator().manual_seed(seed + 1)
    lead, V = s.shape[:-1], s.shape[-1]
    if mask == "none":
        return None
    labels = torch.randint(0, V, lead, generator=g)
    finite = torch.isfinite(s.float())
    # keep labels on finite student entries (a -inf label logit is an infinite CE by definition)
    ok = finite.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    labels = torch.where(ok, labels, finite.float().argmax(-1))
    if mask == "all":
        return torch.full_like(labels, -100)
    drop = torch.rand(lead, generator=g) < 0.3
    return torch.where(drop, torch.full_like(labels, -100), labels)


EPS32 = 2.0 ** -24  # fp32 unit roundoff
ULPS = 4


def _fp32_sizes(s, t, T, labels, div, param):
    """What fp32 rounding is relative to, from the float64 log-probabilities of the rounded inputs.

    Per row (a tensor of the leading shape; 0 for ignored rows): M = 1 + ln V + Σ_j |term_j|, the
    size of the normalisers and of the per-element terms the divergence sums (p·log(p/q) for
    forward KL, q·log(q/p) reverse KL, p·log(p/m) and q·log(q/m) for the mixtures, nothing more
    for TVD). Their fp32 rounding is ~ε·M whatever the algorithm (plain PyTorch too). Ties p ≈ q
    and one-hot rows at |logits| ~ 1e4 cancel such terms down to ~0, so the loss may be off by a
    few ulps of T²·M and the gradient by a few ulps of T·M (reverse KL with a teacher log-ratio of
    3.5e4 at T = 0.5: the exact gradient 8.36e-3 of the likeliest token is the difference of two
    3.5e4-sized terms, one fp32 ulp of which is 3.9e-3).
    Also returns the TVD near-tie mask: |log p − log q| within a few ulps of its own fp32
    rounding, where sign(q − p) and so the TVD gradient (±T q / 2) is not determined by fp32."""
    V = s.shape[-1]
    lp = oracle._logsm(t[..., :V].double() / T)
    lq = oracle._logsm(s.double() / T)
    p, q = lp.exp(), lq.exp()
    d = (lp - lq).abs()
    if div == "forward_kl":
        terms = p * d
    elif div == "reverse_kl":
        terms = q * d
    elif div == "jsd":
        beta = param["beta"]
        lm = oracle._mix(beta, lp, lq)
        terms = beta * p * (lp - lm).abs() + (1 - beta) * q * (lq - lm).abs()
    elif div == "skew_kl":
        terms = p * (lp - oracle._mix(param["alpha"], lp, lq)).abs()
    elif div == "skew_reverse_kl":
        terms = q * (lq - oracle._mix(param["alpha"], lq, lp)).abs()
    else:  # tvd: |p - q| / 2, nothing larger than the normalisers
        terms = torch.zeros_like(p)
    M = 1.0 + math.log(max(V, 1)) + terms.sum(-1)
    if labels is not None:
        M = torch.where(labels == -100, 0.0, M)
    near_tie = d <= 4 * ULPS * EPS32 * (1.0 + math.log(max(V, 1)) + lp.abs() + lq.abs()
                                        + (t[..., :V].double() / T).abs() + (s.double() / T).abs())
    return M, near_tie


class _Grad:
    """Holds a gradient moved back to the CPU under the name the checks below use (x.grad)."""
    def __init__(self, grad):
        self.grad = grad


def _check_case(backend, case):
    div, param, T, V, lead, dtype, pattern, strided, pad, mask, hard, seed = case
    s, t = _make(V, lead, dtype, pattern, strided, pad, seed)
    labels = _labels(s, mask, seed)
    hw = hard if labels is not None else 0.0
    dev = device_for(backend)
    xs, xt = _make(V, lead, dtype, pattern, strided, pad, seed, device=dev)  # same views there
    x = (xs.detach().clone() if not strided else xs.detach()).requires_grad_(True)
    out = kd.kd_loss(x, xt, div, temperature=T, labels=on(backend, labels), hard_weight=hw,
                     reduction="none", backend=backend, **param)
    out.sum().backward()
    assert out.device.type == dev.type, (out.device, dev)
    out, x = cpu(out), _Grad(cpu(x.grad))
    ok = dict(divergence_name=div, temperature=T, labels=labels, hard_weight=hw,
              beta=param.get("beta", 0.5), alpha=param.get("alpha", 0.1), reduction="none")
    exp, exp_grad = oracle.loss_and_grad(s, t, **ok)
    plain, plain_grad = oracle.loss_and_grad(s, t, dtype=torch.float32, **ok)
    what = f"{backend} {div} {param} T={T} V={V} lead={lead} {dtype} {pattern} strided={strided} " \
           f"pad={pad} mask={mask} hard={hw} seed={seed}"
    assert out.dtype == torch.float32 and x.grad.dtype == dtype, what
    assert not torch.isnan(out).any() and not torch.isnan(x.grad).any(), "NaN: " + what
    M, near_tie = _fp32_sizes(s, t, T, labels, div, param)  # per row: each row held to its own allowance
    assert_close(out, exp, dtype, plain=plain, what="loss " + what,
                 abs_floor=ULPS * EPS32 * T * T * M)
    # Each gradient entry is soft_weight·T·q(g - c) + hard_weight·(softmax - onehot): terms of
    # size up to T (and hard_weight) that may cancel to ~0 (ties, identical rows).
    grad = x.grad
    if div == "tvd":  # sign(q - p) is not determined by fp32 at near-ties: compare elsewhere
        grad = torch.where(near_tie, exp_grad.to(grad.dtype), grad)
    assert_close(grad, exp_grad, dtype, plain=plain_grad, what="grad " + what,
                 scale_floor=max(T, hw), abs_floor=(ULPS * EPS32 * T * M).unsqueeze(-1))
    if labels is not None:
        assert (x.grad[labels == -100] == 0).all(), "ignored rows must get exact zeros: " + what


@pytest.mark.parametrize("backend", backend_params())
def test_fuzz_backend_against_oracle(backend):
    if backend == "cuda" and not GPU:
        if not cuda_emulated():
            pytest.skip("backend 'cuda' needs a GPU, or KDKERNELS_CUDA_EMULATE=1 without one")
    elif device_for(backend).type not in backends.BACKENDS[backend].devices:
        pytest.skip(f"backend {backend!r} does not run on {device_for(backend)} tensors")

    interpreted = backend == "triton" and not GPU
    @settings(max_examples=EXAMPLES if not interpreted or PROFILE == "long" else 5,
              deadline=None, derandomize=(PROFILE == "short"), database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(backend))
    def run(case):
        count[0] += 1
        if PROFILE != "long":
            _check_case(backend, case)
            return
        # Long profile: record every failure and go on, so that one run reports all of them
        # (with the seed to reproduce each); the test fails at the end if any case failed.
        try:
            _check_case(backend, case)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
            print(f"fuzz[long] FAILED case {count[0]}: {failures[-1]}", flush=True)
        if count[0] % 500 == 0:
            print(f"fuzz[long] backend={backend}: {count[0]} cases, {len(failures)} failed",
                  flush=True)

    count, failures = [0], []
    run()
    print(f"\nfuzz[{PROFILE}] backend={backend}: {count[0]} cases, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {count[0]} cases failed:\n" + "\n".join(failures)
