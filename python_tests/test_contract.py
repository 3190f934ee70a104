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

DIVS = D.names()  # the six temperature divergences and logit_mse: every backend implements them
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


# ---- teacher gradients (online / mutual distillation) ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["plain", "ugly"])
@pytest.mark.parametrize("div", D.names())
def test_teacher_gradient(backend, div, case, dtype):
    """The gradient w.r.t. the teacher logits (kernels: the exchanged divergence's student
    backward, ops.dense.teacher_grad) against float64 autograd of the oracle, next to the
    student's: padded teacher vocabulary (zero gradient there), row-strided views, ignored rows,
    the hard term; "ugly": |logits| ~ 1e4 with shared -inf columns and V off the block size."""
    if not backends.has(backend, "logit_mse") and div == "logit_mse":
        pytest.skip(f"backend {backend!r} has no logit_mse kernel")
    dev = device_of(backend)
    B, L, V = 2, 5, 1031 if case == "ugly" else 300
    scale = 1e4 if case == "ugly" else 3.0
    s_full = _rand((B, L + 1, V), dtype, dev, scale)
    t_full = _rand((B, L + 1, V + 7), dtype, dev, scale)
    if case == "ugly" and div != "logit_mse":
        s_full[..., [0, 500, V - 1]] = float("-inf")
        t_full[..., [0, 500, V - 1]] = float("-inf")
    if case == "ugly":  # near-identical rows: the divergence of p and q cancels
        t_full[0, 1, :V] = s_full[0, 1]
    s = s_full[:, :-1].detach().requires_grad_(True)    # row-strided views, no copies
    t = t_full[:, :-1].detach().requires_grad_(True)
    labels = _labels((B, L), V, dev)
    labels[0, 0] = -100
    kw = dict(temperature=1.7, labels=labels, hard_weight=0.3, soft_weight=0.8,
              **PARAMS.get(div, {}))
    rows = kd.kd_loss(s, t, div, reduction="none", backend=backend, **kw)
    w = torch.rand(rows.shape, device=rows.device) + 0.5
    (rows * w).sum().backward()
    assert t.grad.dtype == dtype and t.grad.shape == t.shape
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    okw = dict(kw)
    okw.pop("beta", None), okw.pop("alpha", None)
    exp = oracle.rows(s64, t64, **_oracle_kw(div, **okw))
    gs, gt = torch.autograd.grad((exp * w.double()).sum(), (s64, t64))
    # plain PyTorch in the same dtype: the reference backend's autograd
    s_, t_ = (x.detach().clone().requires_grad_(True) for x in (s, t))
    pr = kd.kd_loss(s_, t_, div, reduction="none", backend="reference", **kw)
    ps, pt = torch.autograd.grad((pr * w.to(pr.dtype)).sum(), (s_, t_))
    assert_close(rows, exp.detach(), dtype, pr.detach(), what="loss")
    assert_close(s.grad, gs, dtype, ps, what="student grad")
    assert_close(t.grad, gt, dtype, pt, what="teacher grad")
    assert (t.grad[..., V:] == 0).all(), "padded teacher columns"
    assert (t.grad[labels == -100] == 0).all(), "ignored rows"


# ---- teacher ensembles ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,case", [(2, "plain"), (3, "ugly"), (8, "plain")])
@pytest.mark.parametrize("div", D.kernel_names())  # logit_mse ensembles: reference only
def test_ensemble(backend, div, M, case, dtype):
    """p = Σ_m w_m softmax(t_m / T) against the float64 oracle, values and the student gradient:
    random weights with one of them 0 (M > 2), teachers as row-strided views of padded tensors,
    ignored rows, the hard term; "ugly": |logits| ~ 1e4, -inf columns shared by everyone and in
    one teacher alone, V off the block size, and one row where every teacher equals the student
    (an exact 0 divergence)."""
    if not backends.has(backend, "ensemble"):
        pytest.skip(f"backend {backend!r} has no ensemble kernels")
    dev = device_of(backend)
    B, L, V = 2, 4, 1031 if case == "ugly" else 300
    scale = 1e4 if case == "ugly" else 3.0
    s = _rand((B, L, V), dtype, dev, scale)
    full = [_rand((B, L + 1, V + 5), dtype, dev, scale) for _ in range(M)]
    if case == "ugly":
        s[..., [0, 700]] = float("-inf")
        for x in full:
            x[..., [0, 700]] = float("-inf")
        full[1][..., 5] = float("-inf")
        for x in full:
            x[1, 2, :V] = s[1, 2]
    ts = [x[:, 1:] for x in full]                      # row-strided views, padded vocabulary
    w = torch.rand(M, dtype=torch.float64) + 0.1
    if M > 2:
        w[1] = 0.0
    w = (w / w.sum()).tolist()
    labels = _labels((B, L), V, dev)
    labels[0, 0] = -100
    kw = dict(temperature=1.7, labels=labels, hard_weight=0.3, soft_weight=0.8)
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, ts, div, reduction="none", backend=backend, teacher_weights=w, **kw,
                      **PARAMS.get(div, {}))
    g = torch.rand(rows.shape, device=rows.device) + 0.5
    (rows * g).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    exp = oracle.rows(s64, [t.double() for t in ts], **_oracle_kw(div, **kw), teacher_weights=w)
    (eg,) = torch.autograd.grad((exp * g.double()).sum(), s64)
    x_ = s.detach().clone().requires_grad_(True)
    pr = kd.kd_loss(x_, ts, div, reduction="none", backend="reference", teacher_weights=w, **kw,
                    **PARAMS.get(div, {}))
    (pg,) = torch.autograd.grad((pr * g.to(pr.dtype)).sum(), x_)
    assert_close(rows, exp.detach(), dtype, pr.detach(), what="loss")
    assert_close(x.grad, eg, dtype, pg, what="grad")
    assert (rows.detach()[labels == -100] == 0).all() and (x.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("div", D.kernel_names())
def test_ensemble_of_copies_of_the_student_is_zero(backend, div):
    """Every teacher equal to the student: 0 up to the rounding of log Σ w_m (the kernels form
    log p from a running maximum, exactly log q when the weights sum to 1 in fp32; the reference
    adds log w_m and log-sum-exps)."""
    if not backends.has(backend, "ensemble"):
        pytest.skip(f"backend {backend!r} has no ensemble kernels")
    dev = device_of(backend)
    s = _rand((3, 257), torch.float32, dev, 5.0)
    s[:, 3] = float("-inf")
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, [s, s.clone()], div, reduction="none", backend=backend,
                      teacher_weights=[0.25, 0.75], temperature=1.3, **PARAMS.get(div, {}))
    rows.sum().backward()
    assert rows.detach().abs().max() <= 1e-6, rows
    if div != "tvd":  # |p - q| at a tie: the sign of a rounding error
        assert (x.grad.abs() <= 1e-6).all()


# ---- logit_mse (divergence id 6): the cases of its own --------------------------------------------
# The shared cases above (-inf columns in both, |logits| ~ 1e4, strided views and padded teachers,
# every row ignored, NaN input, identical rows) run it too; here what is particular to it.

MSE = D.get("logit_mse").id
KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def _kernel_backend(backend):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the reference has no kernel contract (forward_rows / backward_rows)")
    return backends.load(backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [1, 7, 1271, 3001])
def test_logit_mse_shapes_and_terms(backend, V, dtype):
    """V = 1, under one vector, not a multiple of the block (1024) nor of any vector width; the
    hard term on and off; the soft term off (hard only)."""
    dev = device_of(backend)
    s, t = _rand((2, 3, V), dtype, dev), _rand((2, 3, V), dtype, dev)
    labels = _labels((2, 3), V, dev)
    _check(s, t, "logit_mse", backend, what=f"V={V} soft")
    _check(s, t, "logit_mse", backend, labels=labels, hard_weight=0.7, what=f"V={V} soft+hard")
    x = s.detach().requires_grad_(True)
    kw = dict(labels=labels, soft_weight=0.0, hard_weight=0.7)
    rows = kd.kd_loss(x, t, "logit_mse", reduction="none", backend=backend, **kw)
    rows.sum().backward()
    exp, exp_grad = oracle.loss_and_grad(s, t, reduction="none", divergence_name="logit_mse",
                                         **kw)
    assert_close(rows, exp, dtype, what="hard only loss")
    assert_close(x.grad, exp_grad, dtype, what="hard only grad")


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_logit_mse_reductions_huge_logits_and_shared_neg_inf(backend, reduction):
    dev = device_of(backend)
    V = 1271
    s, t = _rand((3, 5, V), torch.float32, dev, 1e4), _rand((3, 5, V), torch.float32, dev, 1e4)
    cols = torch.tensor([0, 5, 1023, 1024, V - 1], device=dev)
    s[..., cols] = float("-inf")
    t[..., cols] = float("-inf")
    labels = _labels((3, 5), V, dev)
    labels[labels.remainder(1024) == 0] = 7
    labels[(labels == 5) | (labels == V - 1)] = 6
    kw = dict(labels=labels, hard_weight=0.3, soft_weight=0.6, temperature=3.0)
    x = s.detach().requires_grad_(True)
    out = kd.kd_loss(x, t, "logit_mse", reduction=reduction, backend=backend, **kw)
    out.sum().backward()
    exp, exp_grad = oracle.loss_and_grad(s, t, reduction=reduction, divergence_name="logit_mse",
                                         **kw)
    xp = s.detach().clone().requires_grad_(True)  # plain PyTorch, for the three-way bound
    pr = eager.eager_kd_loss(xp, t, "logit_mse", reduction=reduction, **kw)
    (pg,) = torch.autograd.grad(pr.sum(), xp)
    assert_close(out, exp, torch.float32, pr.detach(), what="loss")
    assert_close(x.grad, exp_grad, torch.float32, pg, what="grad")
    assert (x.grad[..., cols] == 0).all()
    # temperature does not apply
    other = kd.kd_loss(s, t, "logit_mse", reduction=reduction, backend=backend,
                       **dict(kw, temperature=0.25))
    assert torch.equal(out.detach(), other)
    # a counted row with every column left out (-inf in both): n = 0, loss 0, gradient 0
    s[1, 2, :] = float("-inf")
    t[1, 2, :] = float("-inf")
    x = s.detach().requires_grad_(True)
    out = kd.kd_loss(x, t, "logit_mse", reduction=reduction, backend=backend)
    out.sum().backward()
    exp, exp_grad = oracle.loss_and_grad(s, t, reduction=reduction, divergence_name="logit_mse")
    assert_close(out, exp, torch.float32, what="loss, empty row")
    assert_close(x.grad, exp_grad, torch.float32, what="grad, empty row")
    assert (x.grad[1, 2] == 0).all()
    if reduction == "none":
        assert out[1, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_logit_mse_neg_inf_in_one_model_only(backend, side, dtype):
    """-inf in only one of teacher and student: the reference's NaN loss, and the +inf-loss
    gradient rule (docs/precision.md): that row's gradient is NaN in every element; the other
    rows are the oracle's, the ignored row zero."""
    dev = device_of(backend)
    V = 1271
    s, t = _rand((2, 3, V), dtype, dev), _rand((2, 3, V), dtype, dev)
    labels = _labels((2, 3), V, dev, frac_ignored=0.0)
    labels[1, 2] = -100
    (s if side == "student" else t)[0, 0, 1030] = float("-inf")
    s[0, 0, 40] = t[0, 0, 40] = float("-inf")  # a column left out: its gradient is NaN there too
    x = s.detach().requires_grad_(True)
    kw = dict(labels=labels, hard_weight=0.5)
    rows = kd.kd_loss(x, t, "logit_mse", reduction="none", backend=backend, **kw)
    w = torch.rand(rows.shape, device=rows.device) + 0.5
    (rows * w).sum().backward()
    ref = kd.kd_loss(s, t, "logit_mse", reduction="none", backend="reference", **kw)
    assert torch.isnan(ref[0, 0]) and torch.isnan(rows[0, 0])
    assert torch.isnan(x.grad[0, 0]).all(), f"{int(torch.isnan(x.grad[0, 0]).sum())} of {V} NaN"
    others = torch.ones(2, 3, dtype=torch.bool, device=dev)
    others[0, 0] = False
    assert torch.isfinite(rows[others]).all() and torch.isfinite(x.grad[others]).all()
    assert (x.grad[1, 2] == 0).all() and rows[1, 2] == 0
    s64 = s.detach().double()[others].requires_grad_(True)
    exp = oracle.rows(s64, t.detach().double()[others], divergence_name="logit_mse",
                      labels=labels[others], hard_weight=0.5)
    (eg,) = torch.autograd.grad((exp * w[others].double()).sum(), s64)
    assert_close(rows[others], exp.detach(), dtype, what="other rows loss")
    assert_close(x.grad[others], eg, dtype, what="other rows grad")


def test_logit_mse_neg_inf_label_in_both_is_an_infinite_loss_with_finite_gradient(backend):
    """Teacher and student -inf at the label: the column is left out of the MSE, the hard term is
    +inf, and the gradient is the formula's, finite (softmax(s) - onehot, 0 from the MSE)."""
    dev = device_of(backend)
    V = 300
    s, t = _rand((1, 2, V), torch.float32, dev), _rand((1, 2, V), torch.float32, dev)
    labels = torch.tensor([[17, 3]], device=dev)
    s[0, 0, 17] = float("-inf")
    t[0, 0, 17] = float("-inf")
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, t, "logit_mse", labels=labels, hard_weight=0.5, reduction="none",
                      backend=backend)
    rows.sum().backward()
    assert rows[0, 0] == float("inf") and torch.isfinite(rows[0, 1])
    assert torch.isfinite(x.grad).all()
    s64 = s[0, 0].double()
    keep = torch.isfinite(s64)
    c = torch.where(keep, (t[0, 0].double() - s64), 0.0)
    c = torch.where(keep, c - c[keep].mean(), 0.0)
    onehot = torch.nn.functional.one_hot(labels[0, 0], V).double()
    exp = -c / int(keep.sum()) + 0.5 * (torch.softmax(s64, -1) - onehot)
    assert_close(x.grad[0, 0], exp, torch.float32, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logit_mse_stats_layout_and_teacher_gradient_by_swapping(backend, dtype):
    """Stats of div 6: (mu, n, -mu, n, 0, the hard term's max and log-sum-exp of s as the other
    divergences store them). Swapping columns (0, 1) <-> (2, 3) and teacher <-> student gives the
    gradient with respect to the teacher: backward_rows(grad, teacher, student, labels, swapped,
    ..., hard_weight=0) equals the float64 autograd gradient w.r.t. the teacher."""
    mod = _kernel_backend(backend)
    dev = device_of(backend)
    V = 1271
    s = _rand((2, 4, V), dtype, dev, 30.0)
    # offset by 40: mean(t - s) is far from 0, so a wrong sign or column of mu shows in bf16 too
    tbuf = (_rand((2, 5, V + 9), torch.float32, dev, 30.0) + 40.0).to(dtype)
    t = tbuf[:, 1:, :V]  # row-strided, sliced from a padded vocabulary
    cols = torch.tensor([2, 1024], device=dev)
    s[..., cols] = float("-inf")
    t[..., cols] = float("-inf")
    labels = _labels((8,), V, dev)
    labels[(labels == 2) | (labels == 1024)] = 9
    labels[3] = -100
    T, sw, hw, ii = 2.0, 0.8, 0.4, -100
    loss, stats = mod.forward_rows(s, t, labels, MSE, 0.0, T, sw, hw, ii)
    counted = labels != ii
    # the layout
    d = torch.where(torch.isinf(s.double()) & torch.isinf(t.double()), 0.0,
                    t.double() - s.double()).reshape(8, V)
    mu = d.sum(-1) / (V - 2)
    st = stats.cpu()
    assert torch.equal(st[~counted.cpu()], torch.zeros_like(st[~counted.cpu()]))
    st, mu = st[counted.cpu()], mu[counted].cpu()
    assert torch.allclose(st[:, 0].double(), mu, rtol=1e-5, atol=1e-5 * 70)
    assert (st[:, 1] == V - 2).all() and (st[:, 3] == V - 2).all()
    assert torch.equal(st[:, 2], -st[:, 0]) and (st[:, 4] == 0).all()
    _, fkl = mod.forward_rows(s, t, labels, D.get("forward_kl").id, 0.0, T, sw, hw, ii)
    assert torch.allclose(st[:, 5:], fkl.cpu()[counted.cpu()][:, 5:], rtol=1e-6, atol=1e-6)
    # the teacher gradient by swapping
    gl = (torch.rand(8, device=dev) + 0.5)
    swapped = stats[:, [2, 3, 0, 1, 4, 5, 6]].contiguous()
    g_t = mod.backward_rows(gl, t, s, labels, swapped, MSE, 0.0, T, sw, 0.0, ii)
    s64 = s.detach().double()
    t64 = t.detach().double().requires_grad_(True)
    exp = oracle.rows(s64.reshape(8, V), t64.reshape(8, V), divergence_name="logit_mse",
                      labels=labels, soft_weight=sw, hard_weight=hw)
    (exp_g,) = torch.autograd.grad((exp * gl.double()).sum(), t64)
    assert g_t.shape == t.shape and g_t.dtype == dtype
    assert_close(g_t, exp_g, dtype, what="teacher grad")
    assert (g_t.reshape(8, V)[3] == 0).all() and (g_t[..., cols] == 0).all()
    # and the reference's own teacher gradient agrees
    xt = t.detach().clone().requires_grad_(True)
    rows = kd.kd_loss(s, xt, "logit_mse", labels=labels.reshape(2, 4), soft_weight=sw,
                      hard_weight=hw, reduction="none", backend="reference")
    (rows.reshape(8) * gl).sum().backward()
    assert_close(g_t, xt.grad, dtype, what="teacher grad vs reference")


def test_logit_mse_given_stats_is_refused(backend):
    mod = _kernel_backend(backend)
    dev = device_of(backend)
    s, t = _rand((1, 2, 30), torch.float32, dev), _rand((1, 2, 30), torch.float32, dev)
    stats = torch.zeros(2, backends.STATS_WIDTH, device=dev)
    with pytest.raises(ValueError, match="no logit_mse kernel"):
        mod.forward_rows_given_stats(s, t, None, stats, MSE, 0.0, 1.0, -100)


def test_logit_mse_strided_labels_and_grad_inplace(backend):
    """Labels as a strided view (labels[:, 1:]), and grad_inplace (the Triton in-place kernel;
    elsewhere the same result through a copy)."""
    dev = device_of(backend)
    V = 1271
    xs = _rand((2, 5, V), torch.bfloat16, dev)
    xt = _rand((2, 5, V), torch.bfloat16, dev)
    lab_buf = _labels((2, 6), V, dev)
    labels = lab_buf[:, 1:]
    assert not labels.is_contiguous()
    kw = dict(labels=labels, hard_weight=0.4, reduction="sum")
    exp, exp_grad = oracle.loss_and_grad(xs, xt, divergence_name="logit_mse", **kw)
    for inplace in (False, True):
        x = xs.detach().clone()
        leaf = x.clone().requires_grad_(True)
        src = leaf * 1.0 if inplace else leaf  # grad_inplace needs a non-leaf to overwrite
        out = kd.kd_loss(src, xt, "logit_mse", backend=backend, grad_inplace=inplace, **kw)
        out.backward()
        assert_close(out, exp, torch.bfloat16, what=f"loss inplace={inplace}")
        assert_close(leaf.grad, exp_grad, torch.bfloat16, what=f"grad inplace={inplace}")


def test_logit_mse_fused_path_matches_two_kernel_path(backend):
    """The CPU "fused_grad" path (forward_rows_with_grad: one read of the row) against forward_rows
    + backward_rows, with a hard term, ignored rows, an out-of-range label and shared -inf."""
    if backend != "cpu":
        pytest.skip("only the cpu backend has forward_rows_with_grad")
    mod = backends.load("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        V = 2100
        s, t = _rand((2, 3, V), dtype, "cpu", 1e3), _rand((2, 3, V), dtype, "cpu", 1e3)
        s[..., 1500] = float("-inf")
        t[..., 1500] = float("-inf")
        labels = _labels((6,), V, "cpu")
        labels[labels == 1500] = 3
        labels[4] = V + 5  # out of range, not ignore_index: NaN loss (the two-kernel fallback)
        labels[2] = -100
        gs = torch.rand(6) + 0.5
        for hw in (0.0, 0.3):
            args = (labels, MSE, 0.0, 2.0, 0.9, hw, -100)
            loss_f, grad_f = mod.forward_rows_with_grad(s, t, *args, gs)
            loss, stats = mod.forward_rows(s, t, *args)
            grad = mod.backward_rows(gs, s, t, labels, stats, *args[1:])
            assert torch.equal(torch.isnan(loss_f), torch.isnan(loss))
            assert torch.allclose(loss_f, loss, rtol=1e-6, equal_nan=True), (dtype, hw)
            assert torch.allclose(grad_f.float(), grad.float(), rtol=1e-6, atol=1e-7,
                                  equal_nan=True), (dtype, hw)
            assert (grad_f[0, 2] == 0).all()
