"""The contract every backend obeys (DESIGN.md §2, docs/precision.md), written once and run on
every backend available here: reference, cpu (C++), triton (a GPU, or the interpreter on CPU
tensors) and cuda (a GPU, or its host emulation when KDKERNELS_CUDA_EMULATE=1). Each case compares
values and the gradient of a random weighting of the rows with the float64 oracle under the
three-way bound (conftest.assert_close); backend-specific tests live in test_<backend>.py.
"""
import dataclasses
import warnings

import pytest
import torch

import oracle
from conftest import assert_close, backend_params

import kdkernels as kd
from kdkernels import backends
from kdkernels import divergences as D
from kdkernels.tools import eager

pytestmark = pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton", "cuda"))

DIVS = D.kernel_names()
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
GPU = torch.cuda.is_available()


def device_of(backend: str) -> str:
    """Where a backend's test tensors live: CUDA tensors for the GPU backends when there is a
    GPU, CPU tensors otherwise (the interpreter, the emulation, the CPU backends)."""
    return "cuda" if GPU and backend in ("triton", "cuda") else "cpu"


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setenv("KDKERNELS_TRITON_BLOCK", "1024" if not GPU else "4096")


def _oracle_kw(div, **kw):
    return dict(divergence_name=div, **PARAMS.get(div, {}), **kw)


def _check(s, t, div, backend, labels=None, hard_weight=0.0, temperature=2.0, what=""):
    """kd_loss(reduction='none') values and the gradient of a random weighting of the rows."""
    dtype = s.dtype
    s = s.detach().requires_grad_(True)
    kw = dict(temperature=temperature, labels=labels, hard_weight=hard_weight)
    rows = kd.kd_loss(s, t, div, reduction="none", backend=backend, **PARAMS.get(div, {}), **kw)
    w = torch.rand(rows.shape, device=rows.device) + 0.5
    (rows * w).sum().backward()
    assert rows.dtype == torch.float32 and s.grad.dtype == dtype and s.grad.shape == s.shape
    s64 = s.detach().double().requires_grad_(True)
    exp_rows = oracle.rows(s64, t.detach().double(), **_oracle_kw(div, **kw))
    (exp_grad,) = torch.autograd.grad((exp_rows * w.double()).sum(), s64)
    # what plain PyTorch gives from the same inputs (the eager formula), for the three-way bound
    s_ = s.detach().clone().requires_grad_(True)
    pr = eager.eager_kd_loss(s_, t.detach(), div, reduction="none", **PARAMS.get(div, {}), **kw)
    (pg,) = torch.autograd.grad((pr * w.to(pr.dtype)).sum(), s_)
    assert_close(rows, exp_rows.detach(), dtype, pr.detach(), what=f"{what} loss")
    assert_close(s.grad, exp_grad, dtype, pg, what=f"{what} grad")
    if labels is not None:
        ignored = labels == -100
        assert (rows.detach()[ignored] == 0).all()
        assert (s.grad[ignored] == 0).all()


def _rand(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _labels(shape, V, device, frac_ignored=0.3):
    lab = torch.randint(0, V, shape, device=device)
    lab[torch.rand(shape, device=device) < frac_ignored] = -100
    return lab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_shared_neg_inf_columns(backend, div, dtype):
    dev = device_of(backend)
    V = 1271
    s, t = _rand((2, 3, V), dtype, dev), _rand((2, 3, V), dtype, dev)
    cols = torch.tensor([0, 5, 1023, 1024, V - 1], device=dev)
    s[..., cols] = float("-inf")
    t[..., cols] = float("-inf")
    labels = _labels((2, 3), V, dev)
    labels[labels == 5] = 6
    labels[(labels == 0) | (labels == 1023) | (labels == 1024) | (labels == V - 1)] = 7
    _check(s, t, div, backend, labels=labels, hard_weight=0.5, what=f"{div} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_huge_logits(backend, div, dtype):
    """|logits| ~ 1e4: independent teacher and student, and a student close to the teacher."""
    dev = device_of(backend)
    V = 1271
    s, t = _rand((2, 2, V), dtype, dev, 1e4), _rand((2, 2, V), dtype, dev, 1e4)
    _check(s, t, div, backend, labels=_labels((2, 2), V, dev), hard_weight=0.5, what="independent")
    near = (t.float() + torch.randn_like(t.float()) * 30).to(dtype)
    _check(near, t, div, backend, what="near")


@pytest.mark.parametrize("div", DIVS)
def test_underflow_no_nan(backend, div):
    """Entries where p and q both underflow to 0 with finite logits (JSD's log m must not NaN),
    and identical distributions (value 0; TVD ties have sign 0, so a zero gradient)."""
    dev = device_of(backend)
    V = 700
    t = _rand((1, 3, V), torch.float32, dev)
    t[..., ::3] -= 3000.0
    s = t.clone()
    s[0, 1:] += torch.randn_like(s[0, 1:]) * 0.5
    _check(s, t, div, backend, temperature=1.0)
    same = t.clone().requires_grad_(True)
    rows = kd.kd_loss(same, t, div, reduction="none", backend=backend, **PARAMS.get(div, {}))
    rows.sum().backward()
    assert rows.abs().max() < 1e-5
    assert not torch.isnan(same.grad).any()
    assert same.grad.abs().max() < 1e-6


def test_strided_views_and_padded_teacher(backend):
    """Student x[:, :-1] (row-strided), teacher a padded vocabulary sliced from a sequence-shifted
    buffer: no copy (no warning), correct values and gradient for every divergence."""
    dev = device_of(backend)
    V, Vt = 1271, 1300
    xs = _rand((2, 5, V), torch.bfloat16, dev)
    xt = _rand((2, 5, Vt), torch.bfloat16, dev)
    s, t = xs[:, :-1], xt[:, 1:]
    labels = _labels((2, 4), V, dev)
    for div in DIVS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # as_rows warns when it has to copy
            _check(s, t, div, backend, labels=labels, hard_weight=0.3, what=div)


def test_all_rows_ignored(backend):
    dev = device_of(backend)
    s, t = _rand((2, 3, 1271), torch.float32, dev), _rand((2, 3, 1271), torch.float32, dev)
    s[0, 0] = float("nan")  # padding rows may hold anything; they must not leak
    s.requires_grad_(True)
    labels = torch.full((2, 3), -100, device=dev)
    for div in DIVS:
        s.grad = None
        out = kd.kd_loss(s, t, div, labels=labels, hard_weight=1.0, backend=backend)
        out.backward()
        assert out.item() == 0.0
        assert (s.grad == 0).all()


def test_nan_input_gives_nan(backend):
    dev = device_of(backend)
    s, t = _rand((1, 2, 100), torch.float32, dev), _rand((1, 2, 100), torch.float32, dev)
    s[0, 0, 3] = float("nan")
    for div in DIVS:
        rows = kd.kd_loss(s, t, div, reduction="none", backend=backend)
        assert torch.isnan(rows[0, 0]) and torch.isfinite(rows[0, 1])


def test_out_of_range_label_is_nan(backend):
    """An out-of-range label that is not ignore_index gives a NaN row (never a read outside the
    row); the API refuses it on CPU tensors, so this goes below it, to the row op."""
    dev = device_of(backend)
    s, t = _rand((1, 3, 20), torch.float32, dev), _rand((1, 3, 20), torch.float32, dev)
    labels = torch.tensor([3, 20, -5], device=dev)
    if backend == "reference":
        rows = backends.load("reference").loss_rows(s, t, labels, 0, 0.0, 1.0, 1.0, 1.0, -100)
    else:
        rows = backends.load(backend).forward_rows(s, t, labels, 0, 0.0, 1.0, 1.0, 1.0, -100)[0]
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isnan(rows[2])


@pytest.mark.parametrize("div", DIVS)
def test_identical_distributions_give_zero(backend, div):
    dev = device_of(backend)
    s = _rand((2, 2, 500), torch.float32, dev)
    for T in (1.0, 2.0):
        rows = kd.kd_loss(s, s.clone(), div, temperature=T, reduction="none", backend=backend,
                          **PARAMS.get(div, {}))
        assert rows.abs().max() < 1e-5, (div, T)


# ---- the +inf-loss gradient rule (docs/precision.md) ------------------------------------------
# A counted row's gradient is finite in every element or NaN in every element. Rows whose loss is
# +inf because the student has -inf where the teacher has mass (forward KL, skew KL at alpha = 0)
# or where the label is (the hard term) keep the formula's finite gradient; rows where the
# teacher has -inf under student mass (reverse KL, skew reverse KL at alpha = 0) have an infinite
# term in the gradient and are NaN throughout. Other rows are untouched.

INF_CASES = {
    # name: (divergence, params, which side gets the -inf, hard_weight, expected row-0 gradient)
    "forward_kl_student_neginf": ("forward_kl", {}, "student", 0.0, "finite"),
    "skew_kl_alpha0_student_neginf": ("skew_kl", {"alpha": 0.0}, "student", 0.0, "finite"),
    "hard_label_neginf": ("forward_kl", {}, "label", 1.0, "finite"),
    "reverse_kl_teacher_neginf": ("reverse_kl", {}, "teacher", 0.0, "nan"),
    "reverse_kl_teacher_neginf_hard": ("reverse_kl", {}, "teacher", 0.5, "nan"),
    "skew_reverse_kl_alpha0_teacher_neginf": ("skew_reverse_kl", {"alpha": 0.0}, "teacher", 0.0,
                                              "nan"),
}


@pytest.mark.parametrize("path", ["default", "two_kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(INF_CASES))
def test_infinite_loss_gradient_rule(backend, case, dtype, path, monkeypatch):
    """path "default": what kd_loss takes when the student needs a gradient, the fused op
    (kdkernels::kd_rows_with_grad) on the backends with "fused_grad" (cpu, triton, cuda);
    "two_kernel": the same backend without "fused_grad" (kd_rows + kd_rows_backward)."""
    div, params, side, hw, expect = INF_CASES[case]
    spec = backends.BACKENDS[backend]
    if path == "two_kernel":
        if "fused_grad" not in spec.features:
            pytest.skip(f"{backend} has no fused path: the default path is the two-kernel one")
        monkeypatch.setitem(backends.BACKENDS, backend,
                            dataclasses.replace(spec, features=spec.features - {"fused_grad"}))
    dev = device_of(backend)
    T, V = 2.0, 1271
    s, t = _rand((2, 3, V), dtype, dev), _rand((2, 3, V), dtype, dev)
    labels = _labels((2, 3), V, dev, frac_ignored=0.0)
    labels[1, 2] = -100
    col = int(labels[0, 0])  # row 0 gets the infinite term, at its label's column
    if side == "student" or side == "label":
        s[0, 0, col] = float("-inf")
    else:
        t[0, 0, col] = float("-inf")
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, t, div, labels=labels, hard_weight=hw, temperature=T, reduction="none",
                      backend=backend, **params)
    w = torch.rand(rows.shape, device=rows.device) + 0.5
    (rows * w).sum().backward()
    assert rows[0, 0] == float("inf"), rows[0, 0]
    g0 = x.grad[0, 0]
    if expect == "nan":
        assert torch.isnan(g0).all(), f"{int(torch.isnan(g0).sum())} of {V} NaN"
    else:
        assert torch.isfinite(g0).all()
        # the formula's value, in float64: T·(q − p) (the soft terms' limit) + softmax(s) − onehot
        s64, t64 = s[0, 0].double(), t[0, 0].double()
        exp = T * (torch.softmax(s64 / T, -1) - torch.softmax(t64 / T, -1))
        if hw:
            onehot = torch.nn.functional.one_hot(labels[0, 0], V).double()
            exp = exp + hw * (torch.softmax(s64, -1) - onehot)
        exp = exp * float(w[0, 0])
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * T
        assert (g0.double() - exp).abs().max() <= tol * float(w[0, 0]) + 1e-6
    # every other counted row is finite and is the oracle's; the ignored row is zero
    others = torch.ones(2, 3, dtype=torch.bool, device=dev)
    others[0, 0] = False
    assert torch.isfinite(rows[others]).all() and torch.isfinite(x.grad[others]).all()
    assert (x.grad[1, 2] == 0).all() and rows[1, 2] == 0
    s64 = s.detach().double()[others].requires_grad_(True)
    exp_rows = oracle.rows(s64, t.detach().double()[others], labels=labels[others],
                           hard_weight=hw, divergence_name=div, temperature=T, **params)
    (eg,) = torch.autograd.grad((exp_rows * w[others].double()).sum(), s64)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert torch.allclose(rows[others].double(), exp_rows.detach(), rtol=tol, atol=tol)
    assert torch.allclose(x.grad[others].double(), eg, rtol=tol, atol=tol * T)
