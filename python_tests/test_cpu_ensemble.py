"""Teacher ensembles on the C++ CPU backend (csrc/cpu/ensemble_cpu.cpp, kdkernels.ops.ensemble):
p = Σ_m w_m softmax(t_m / T) against the float64 oracle (the reference backend in float64), for
every temperature divergence, M = 2, 3, 8 teachers with random weights (a zero weight among
them), fp32 and bf16, −inf columns, ±1e4 logits, strided views, ignored rows, the hard term, the
reductions, the +inf-loss gradient rule (docs/precision.md), exact zeros, opcheck and
torch.compile(fullgraph=True). Error bound: conftest.assert_close, with the reference in the input
dtype as the "plain PyTorch" term.
"""
import warnings

import pytest
import torch

import kdkernels as kd
from kdkernels import backends
from kdkernels import divergences as D
from kdkernels.backends import compiled as cpp
from kdkernels.ops.ensemble import (drop_zero_weight_teachers, kd_rows_ensemble,
                                    kd_rows_ensemble_backward, kd_rows_ensemble_with_grad)

from conftest import assert_close

REASON = cpp.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"C++ CPU backend unavailable: {REASON}")

DIVS = D.kernel_names()
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
NEG_INF = float("-inf")


def _weights(M, zero=True, gen=None):
    w = torch.rand(M, generator=gen, dtype=torch.float64) + 0.05
    if zero and M >= 3:
        w[1] = 0.0  # a teacher of weight 0 among the others
    w = w / w.sum()
    return [float(x) for x in w]


def _rand(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype)


def _run(s, ts, ws, div, backend, reduction="none", **kw):
    """kd_loss on ``backend`` and the student gradient of a fixed random weighting of the rows."""
    x = s.detach().clone().requires_grad_(True)
    out = kd.kd_loss(x, ts, div, teacher_weights=ws, reduction=reduction, backend=backend,
                     **PARAMS.get(div, {}), **kw)
    w = torch.rand(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    (out.double() * w).sum().backward()
    return out.detach(), x.grad


def _check(s, ts, ws, div, labels=None, hard_weight=0.0, temperature=2.0, reduction="none",
           what="", **extra):
    """cpu vs the float64 reference (values and gradient), with the reference in the input dtype
    as the plain-PyTorch term of the bound."""
    dtype = s.dtype
    kw = dict(temperature=temperature, labels=labels, hard_weight=hard_weight, **extra)
    got, g = _run(s, ts, ws, div, "cpu", reduction, **kw)
    exp, eg = _run(s.double(), [t.double() for t in ts], ws, div, "reference", reduction, **kw)
    plain, pg = _run(s, ts, ws, div, "reference", reduction, **kw)
    assert got.dtype == torch.float32 and g.dtype == dtype and g.shape == s.shape
    assert_close(got, exp, dtype, plain, what=f"{what} loss")
    assert_close(g, eg, dtype, pg, what=f"{what} grad")
    if labels is not None and reduction == "none":
        ignored = labels == -100
        assert (got[ignored] == 0).all() and (g[ignored] == 0).all()
    return got, g


def _labels(shape, V, frac_ignored=0.3):
    lab = torch.randint(0, V, shape)
    lab[torch.rand(shape) < frac_ignored] = -100
    return lab


def test_cpu_lists_ensemble():
    assert "ensemble" in backends.BACKENDS["cpu"].features
    assert backends.choose("auto", torch.device("cpu"), torch.float32,
                           frozenset({"ensemble"})) == "cpu"
    # logit_mse ensembles stay on the reference (kd_loss: a combination no kernel computes)
    s, t1, t2 = torch.randn(3, 20), torch.randn(3, 20), torch.randn(3, 20)
    with pytest.raises(ValueError, match="logit_mse with an ensemble"):
        kd.kd_loss(s, [t1, t2], "logit_mse", backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [2, 3, 8])
@pytest.mark.parametrize("div", DIVS)
def test_against_oracle(div, M, dtype):
    """Strided views (student x[:, :-1], teachers sliced from sequence-shifted, padded buffers),
    V not a multiple of the block, −inf columns shared by every model and −inf columns of one
    teacher only, ignored rows, with and without the hard term."""
    V, Vt = 1100, 1130
    xs = _rand((2, 5, V), dtype)
    s = xs[:, :-1]
    bufs = [_rand((2, 5, Vt), dtype) for _ in range(M)]
    shared = [0, 7, 1023, 1024, V - 1]
    for b in bufs:
        b[..., shared] = NEG_INF
    xs[..., shared] = NEG_INF
    bufs[0][..., [3, 500, 1050]] = NEG_INF  # one teacher only: the others keep p > 0 there
    ts = [b[:, 1:] for b in bufs]
    ws = _weights(M)
    labels = _labels((2, 4), V)
    labels[(labels >= 0) & torch.isin(labels, torch.tensor(shared))] = 5
    for hw in (0.0, 0.4):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # as_rows warns when it has to copy
            got, g = _check(s, ts, ws, div, labels=labels, hard_weight=hw,
                            what=f"{div} M={M} {dtype} hard={hw}")
        assert (g[..., shared] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_stacked_teachers_and_temperature_one(div, dtype):
    """A stacked [M, ..., V] teacher; T = 1 with the hard term (it shares the soft normaliser)."""
    s = _rand((3, 4, 777), dtype)
    ts = _rand((3, 3, 4, 777), dtype)
    ws = [0.5, 0.2, 0.3]
    labels = _labels((3, 4), 777)
    _check(s, ts, ws, div, labels=labels, hard_weight=0.7, temperature=1.0, what="stacked")
    got = kd.kd_loss(s, ts, div, teacher_weights=ws, reduction="none", backend="cpu",
                     **PARAMS.get(div, {}))
    assert torch.equal(got, kd.kd_loss(s, list(ts.unbind(0)), div, teacher_weights=ws,
                                       reduction="none", backend="cpu", **PARAMS.get(div, {})))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_huge_logits(div, dtype):
    """|logits| ~ 1e4: independent models, and a student and teachers close to each other."""
    V = 1271
    for M in (2, 3):
        s = _rand((2, 2, V), dtype, 1e4)
        ts = [_rand((2, 2, V), dtype, 1e4) for _ in range(M)]
        ws = _weights(M, zero=False)
        _check(s, ts, ws, div, labels=_labels((2, 2), V), hard_weight=0.5, what="independent")
        base = torch.randn(2, 2, V) * 1e4
        near = [(base + torch.randn(2, 2, V) * 30).to(dtype) for _ in range(M + 1)]
        _check(near[0], near[1:], ws, div, what="near")


@pytest.mark.parametrize("div", DIVS)
def test_identical_teachers_equal_to_the_student_give_exactly_zero(div):
    for dtype in (torch.float32, torch.bfloat16):
        s = _rand((2, 3, 1500), dtype)
        s[..., [4, 1200]] = NEG_INF
        for M in (2, 3, 8):
            ws = _weights(M, zero=False)
            for T in (1.0, 2.0, 0.7):
                x = s.clone().requires_grad_(True)
                rows = kd.kd_loss(x, [s.clone() for _ in range(M)], div, teacher_weights=ws,
                                  temperature=T, reduction="none", backend="cpu",
                                  **PARAMS.get(div, {}))
                assert (rows == 0).all(), (div, dtype, M, T, rows)
                rows.sum().backward()
                assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-6


def test_zero_weight_teachers():
    """Teachers of weight 0 drop out above the kernel (one left: the single-teacher path,
    bitwise); the kernel itself also skips them (bitwise the same as without them)."""
    s, t1, t2, t3 = (_rand((2, 3, 300), torch.float32) for _ in range(4))
    t3[0, 0, :] = float("nan")  # a zero-weight teacher takes no part at all
    for div in DIVS:
        p = PARAMS.get(div, {})
        single = kd.kd_loss(s, t2, div, reduction="none", backend="cpu", **p)
        assert torch.equal(kd.kd_loss(s, [t1, t2], div, teacher_weights=[0.0, 1.0],
                                      reduction="none", backend="cpu", **p), single)
        two = kd.kd_loss(s, [t1, t2], div, teacher_weights=[0.25, 0.75], reduction="none",
                         backend="cpu", **p)
        three = kd.kd_loss(s, [t1, t3, t2], div, teacher_weights=[0.25, 0.0, 0.75],
                           reduction="none", backend="cpu", **p)
        assert torch.equal(two, three)
        d = D.get(div)
        args = (d.id, d.check_param(p.get("beta", p.get("alpha"))), 2.0, 1.0, 0.0, -100)
        l2, st2 = cpp.forward_rows_ensemble(s, [t1, t2], [0.25, 0.75], None, *args)
        l3, st3 = cpp.forward_rows_ensemble(s, [t1, t3, t2], [0.25, 0.0, 0.75], None, *args)
        assert torch.equal(l2, l3) and torch.equal(st2[:, :7], st3[:, :7])
        assert torch.equal(st2[:, 7:], st3[:, 9:]) and (st3[:, 7:9] == 0).all()
        gl = torch.rand(6)
        assert torch.equal(cpp.backward_rows_ensemble(gl, s, [t1, t2], [0.25, 0.75], None, st2, *args),
                           cpp.backward_rows_ensemble(gl, s, [t1, t3, t2], [0.25, 0.0, 0.75], None,
                                                      st3, *args))
    assert drop_zero_weight_teachers([t1, t2, t3], [0.5, 0.0, 0.5])[1] == [0.5, 0.5]
    assert drop_zero_weight_teachers([t1, t2], [0.0, 1.0]) == ([t2], None)


def test_near_tie_teacher_huge_logits_low_temperature():
    """Before the fix the ensemble kernels scaled by 1/T before subtracting the max, as the
    single-teacher kernels did (test_regressions.py::
    test_forward_kl_near_tie_teacher_huge_logits_low_temperature): at |logits| ~ 1e4, T = 0.05,
    t/T rounds by up to 0.008, which moves a near-tie teacher's mass and a forward KL of ~2e5
    nats by hundreds. The fuzz case's three rows, as an ensemble of the teacher and the teacher
    shifted by -0.5 (the same distribution, so p is the single teacher's)."""
    g = torch.Generator().manual_seed(5059)
    V = 65537
    s = torch.randn(2, 2, 3, V, generator=g) * 3
    t = torch.randn(2, 2, 3, V + 3, generator=g) * 3
    s = s.sign() * 1e4 * torch.rand(s.shape, generator=g)
    t = t.sign() * 1e4 * torch.rand(t.shape, generator=g)
    rows = [3, 5, 6]
    s = s[..., :-1, :].reshape(-1, V)[rows].contiguous()
    t = t[..., 1:, :V].reshape(-1, V)[rows].contiguous()
    _check(s, [t, t - 0.5], [0.4, 0.6], "forward_kl", temperature=0.05)


def test_stats_layout():
    """Columns 0..6 as the single teacher's (teacher 0 in 0..1), then (max, lse) of teacher m:
    the max of its raw logits t_m and the log sum-exp of (t_m - max) / T."""
    s = _rand((2, 3, 500), torch.float32)
    ts = [_rand((2, 3, 500), torch.float32) for _ in range(3)]
    T = 2.0
    loss, st = cpp.forward_rows_ensemble(s, ts, [0.2, 0.3, 0.5], None, 2, 0.5, T, 1.0, 0.0, -100)
    assert st.shape == (6, backends.ensemble_stats_width(3)) == (6, 11)
    for m, col in ((0, 0), (1, 7), (2, 9)):
        t = ts[m].reshape(6, -1)
        mx = t.max(-1).values
        torch.testing.assert_close(st[:, col], mx)
        torch.testing.assert_close(st[:, col + 1], torch.logsumexp((t - mx[:, None]) / T, -1))
    b = s.reshape(6, -1) / T
    torch.testing.assert_close(st[:, 2] / T + st[:, 3], torch.logsumexp(b, -1))


def test_all_rows_ignored():
    s, ts = _rand((2, 3, 1271), torch.float32), [_rand((2, 3, 1271), torch.float32) for _ in range(3)]
    s[0, 0] = float("nan")  # padding rows may hold anything; they must not leak
    ts[1][0, 1] = float("nan")
    labels = torch.full((2, 3), -100)
    for div in DIVS:
        x = s.clone().requires_grad_(True)
        out = kd.kd_loss(x, ts, div, teacher_weights=[0.3, 0.3, 0.4], labels=labels,
                         hard_weight=1.0, backend="cpu")
        out.backward()
        assert out.item() == 0.0 and (x.grad == 0).all()


def test_nan_input_gives_nan():
    s, ts = _rand((1, 2, 100), torch.float32), [_rand((1, 2, 100), torch.float32) for _ in range(2)]
    ts[1][0, 0, 3] = float("nan")
    for div in DIVS:
        rows = kd.kd_loss(s, ts, div, teacher_weights=[0.5, 0.5], reduction="none", backend="cpu")
        assert torch.isnan(rows[0, 0]) and torch.isfinite(rows[0, 1]), div


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_token_weights_and_num_items(reduction):
    V = 600
    s = _rand((3, 5, V), torch.float32)
    ts = [_rand((3, 5, V), torch.float32) for _ in range(3)]
    labels = _labels((3, 5), V)
    tw = torch.rand(3, 5) + 0.2
    for div in ("forward_kl", "jsd", "tvd"):
        _check(s, ts, [0.2, 0.5, 0.3], div, labels=labels, hard_weight=0.3, reduction=reduction,
               what=f"{div} {reduction}", token_weights=tw)
        if reduction == "batchmean":
            _check(s, ts, [0.2, 0.5, 0.3], div, labels=labels, reduction=reduction,
                   what=f"{div} num_items", num_items_in_batch=37)


# ---- the +inf-loss gradient rule (docs/precision.md) --------------------------------------------

INF_CASES = {
    # name: (divergence, params, where the -inf goes, hard_weight, expected row-0 gradient)
    "forward_kl_student_neginf": ("forward_kl", {}, "student", 0.0, "finite"),
    "skew_kl_alpha0_student_neginf": ("skew_kl", {"alpha": 0.0}, "student", 0.0, "finite"),
    "hard_label_neginf": ("forward_kl", {}, "label", 1.0, "finite"),
    "reverse_kl_all_teachers_neginf": ("reverse_kl", {}, "teachers", 0.0, "nan"),
    "reverse_kl_all_teachers_neginf_hard": ("reverse_kl", {}, "teachers", 0.5, "nan"),
    "skew_reverse_kl_alpha0_all_teachers_neginf": ("skew_reverse_kl", {"alpha": 0.0}, "teachers",
                                                   0.0, "nan"),
    "reverse_kl_one_teacher_neginf": ("reverse_kl", {}, "one teacher", 0.0, "oracle"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(INF_CASES))
def test_infinite_loss_gradient_rule(case, dtype):
    div, params, side, hw, expect = INF_CASES[case]
    T, V = 2.0, 1271
    s = _rand((2, 3, V), dtype)
    ts = [_rand((2, 3, V), dtype) for _ in range(3)]
    ws = [0.2, 0.5, 0.3]
    labels = _labels((2, 3), V, frac_ignored=0.0)
    labels[1, 2] = -100
    col = int(labels[0, 0])
    if side in ("student", "label"):
        s[0, 0, col] = NEG_INF
    elif side == "teachers":
        for t in ts:
            t[0, 0, col] = NEG_INF
    else:
        ts[1][0, 0, col] = NEG_INF
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, ts, div, teacher_weights=ws, labels=labels, hard_weight=hw,
                      temperature=T, reduction="none", backend="cpu", **params)
    w = torch.rand(rows.shape) + 0.5
    (rows * w).sum().backward()
    g0 = x.grad[0, 0]
    if expect == "oracle":  # the other teachers keep p > 0 there: everything finite
        _check(s, ts, ws, div, labels=labels, hard_weight=hw, temperature=T, **params)
        return
    assert rows[0, 0] == float("inf"), rows[0, 0]
    if expect == "nan":
        assert torch.isnan(g0).all(), f"{int(torch.isnan(g0).sum())} of {V} NaN"
    else:
        assert torch.isfinite(g0).all()
        s64 = s[0, 0].double()
        p = sum(wm * torch.softmax(t[0, 0].double() / T, -1) for wm, t in zip(ws, ts))
        exp = T * (torch.softmax(s64 / T, -1) - p)
        if hw:
            exp = exp + hw * (torch.softmax(s64, -1)
                              - torch.nn.functional.one_hot(labels[0, 0], V).double())
        exp = exp * float(w[0, 0])
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * T
        assert (g0.double() - exp).abs().max() <= tol * float(w[0, 0]) + 1e-6
    others = torch.ones(2, 3, dtype=torch.bool)
    others[0, 0] = False
    assert torch.isfinite(rows[others]).all() and torch.isfinite(x.grad[others]).all()
    assert (x.grad[1, 2] == 0).all() and rows[1, 2] == 0


# ---- the fused path, the ops, torch.compile -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_equals_two_kernel_path(dtype):
    """kd_loss uses kd_rows_ensemble_with_grad when the student needs a gradient; it gives the
    two-kernel losses bitwise and their gradient up to rounding (the same element math, compiled
    in other loops: a few ulps apart for the mixture divergences), and the gradient for any
    grad_loss (rescaled)."""
    V = 1500
    s = _rand((2, 4, V), dtype)
    ts = [_rand((2, 4, V), dtype) for _ in range(3)]
    ws = [0.2, 0.5, 0.3]
    lab = _labels((8,), V)
    for div in DIVS:
        d = D.get(div)
        for hw, T in ((0.0, 2.0), (0.5, 1.0), (0.5, 2.0)):
            args = (d.id, d.check_param(None), T, 1.0, hw, -100)
            loss, stats = kd_rows_ensemble(s, ts, ws, lab, "cpu", *args)
            gl = torch.rand(8) + 0.5
            g = kd_rows_ensemble_backward(gl, s, ts, ws, lab, stats, "cpu", *args)
            fl, fg = kd_rows_ensemble_with_grad(s, ts, ws, lab, "cpu", *args, gl)
            assert torch.equal(fl, loss), (div, hw, T)
            tol = 4 * torch.finfo(dtype).eps * float(g.float().abs().max())
            assert (fg.float() - g.float()).abs().max() <= tol, (div, hw, T)
    x = s.clone().requires_grad_(True)
    out = kd.kd_loss(x, ts, "jsd", teacher_weights=ws, labels=lab.view(2, 4), hard_weight=0.3,
                     backend="cpu")
    out.backward()
    with torch.no_grad():
        assert torch.equal(out, kd.kd_loss(s, ts, "jsd", teacher_weights=ws,
                                           labels=lab.view(2, 4), hard_weight=0.3, backend="cpu"))
    y = s.clone().requires_grad_(True)
    loss, _ = kd_rows_ensemble(y, ts, ws, lab, "cpu", D.get("jsd").id, 0.5, 1.0, 1.0, 0.3, -100)
    (loss.sum() / (lab != -100).sum()).backward()
    assert_close(x.grad, y.grad, dtype, what="fused vs two-kernel gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_opcheck(div, dtype):
    d = D.get(div)
    s = _rand((2, 3, 129), dtype).requires_grad_(True)
    ts = [_rand((2, 3, 140), dtype)[..., :129] for _ in range(3)]
    ws = [0.2, 0.5, 0.3]
    lab = torch.randint(0, 129, (6,))
    lab[1] = -100
    args = (s, ts, ws, lab, "cpu", d.id, d.check_param(None), 2.0, 1.0, 0.5, -100)
    torch.library.opcheck(kd_rows_ensemble, args)
    _, stats = kd_rows_ensemble(*args)
    torch.library.opcheck(kd_rows_ensemble_backward,
                          (torch.rand(6), s.detach(), ts, ws, lab, stats, "cpu", *args[5:]),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    for gs in (None, torch.rand(6) + 0.5):
        torch.library.opcheck(kd_rows_ensemble_with_grad, args + (gs,))
    scal = args[5:]
    sd = s.detach()
    torch.library.opcheck(torch.ops.kdkernels_C.kd_rows_ens_fwd.default, (sd, ts, ws, lab, *scal))
    torch.library.opcheck(torch.ops.kdkernels_C.kd_rows_ens_bwd.default,
                          (torch.rand(6), sd, ts, ws, lab, stats.detach(), *scal))
    torch.library.opcheck(torch.ops.kdkernels_C.kd_rows_ens_fwd_grad.default,
                          (sd, ts, ws, lab, *scal, None))


def test_compile_fullgraph():
    s = _rand((2, 3, 300), torch.float32)
    ts = [_rand((2, 3, 300), torch.float32) for _ in range(3)]
    lab = _labels((2, 3), 300)
    for div in ("forward_kl", "jsd"):
        f = torch.compile(lambda a, b, c, d: kd.kd_loss(a, [b, c, d], div, temperature=2.0,
                                                        teacher_weights=[0.2, 0.0, 0.8],
                                                        labels=lab, hard_weight=0.2,
                                                        backend="cpu"),
                          fullgraph=True, backend="aot_eager")
        f3 = torch.compile(lambda a, b, c, d: kd.kd_loss(a, [b, c, d], div, temperature=2.0,
                                                         teacher_weights=[0.2, 0.3, 0.5],
                                                         labels=lab, backend="cpu"),
                           fullgraph=True, backend="aot_eager")
        for fn, ws, hw in ((f, [0.2, 0.0, 0.8], 0.2), (f3, [0.2, 0.3, 0.5], 0.0)):
            x = s.clone().requires_grad_(True)
            out = fn(x, *ts)
            out.backward()
            y = s.clone().requires_grad_(True)
            exp = kd.kd_loss(y, ts, div, temperature=2.0, teacher_weights=ws, labels=lab,
                             hard_weight=hw, backend="cpu")
            exp.backward()
            torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-9)


def test_bad_arguments():
    s = _rand((2, 3, 50), torch.float32)
    ts = [_rand((2, 3, 50), torch.float32) for _ in range(2)]
    op = torch.ops.kdkernels_C.kd_rows_ens_fwd
    with pytest.raises(ValueError, match="weights for"):
        op(s, ts, [1.0], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="every teacher weight is 0"):
        op(s, ts, [0.0, 0.0], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="finite and >= 0"):
        op(s, ts, [1.5, -0.5], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(TypeError, match="teacher dtype"):
        op(s, [ts[0], ts[1].half()], [0.5, 0.5], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="teacher shape"):
        op(s, [ts[0], ts[1][..., :40]], [0.5, 0.5], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
