"""The fused CPU path: kdkernels::kd_rows_with_grad (loss and gradient in one kernel call).

kd_loss takes it on backend="cpu" when the student requires grad and grad mode is on (and not
grad_inplace). Its gradient is computed in forward for the grad_loss that the reduction will send
back (a hint), and rescaled in backward only where the real grad_loss differs. Checked against
the float64 oracle (test_cpu_backend.check) and against the two-kernel path.
"""
import pytest
import torch

import kdkernels as kd
from kdkernels import divergences
from kdkernels.backends import compiled as cpp
from kdkernels.ops import dense as ops
from kdkernels.ops.dense import kd_rows, kd_rows_backward, kd_rows_with_grad, scale_rows

import oracle
from conftest import TOL, assert_close
from test_cpu_backend import DIVS, DTYPES, _kw, check, logits

REASON = cpp.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"C++ CPU backend unavailable: {REASON}")


class Counter:
    """Counts calls of cpp.forward_rows_with_grad (the fused kernel) and cpp.forward_rows."""

    def __init__(self, monkeypatch):
        self.fused = self.plain = 0
        fused, plain = cpp.forward_rows_with_grad, cpp.forward_rows

        def count_fused(*a, **k):
            self.fused += 1
            return fused(*a, **k)

        def count_plain(*a, **k):
            self.plain += 1
            return plain(*a, **k)

        monkeypatch.setattr(cpp, "forward_rows_with_grad", count_fused)
        monkeypatch.setattr(cpp, "forward_rows", count_plain)


@pytest.fixture
def counter(monkeypatch):
    return Counter(monkeypatch)


def _grad(s, t, **kw):
    x = s.detach().requires_grad_(True)
    out = kd.kd_loss(x, t, backend="cpu", **kw)
    (out if out.dim() == 0 else out.sum()).backward()
    return out.detach(), x.grad


def _oracle_grad(s, t, reduction="batchmean", scale=1.0, **kw):
    okw = {k: v for k, v in kw.items() if k != "divergence"}
    okw["divergence_name"] = kw.get("divergence", "forward_kl")
    w = okw.pop("token_weights", None)
    s64 = s.detach().double().requires_grad_(True)
    if w is None:
        out = oracle.loss(s64, t.detach(), reduction=reduction, **okw)
    else:  # weighted rows; batchmean divides by the sum of the weights (no labels here)
        r = oracle.rows(s64, t.detach(), **okw) * w.double()
        out = {"sum": r.sum(), "batchmean": r.sum() / w.sum(),
               "mean": r.sum() / w.sum() / s.shape[-1]}[reduction]
    out = out * scale
    (g,) = torch.autograd.grad(out, s64)
    return out.detach(), g


def _ref_grad(s, t, scale=1.0, **kw):
    x = s.detach().requires_grad_(True)
    out = kd.kd_loss(x, t, backend="reference", **kw) * scale
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# ---- the fused op is the one used, and only when a gradient is wanted ----------------------------

def test_fused_path_taken_only_when_grad_needed(counter):
    s, t = logits((2, 3, 500), torch.float32), logits((2, 3, 500), torch.float32)
    _grad(s, t, temperature=2.0)
    assert (counter.fused, counter.plain) == (1, 0)
    with torch.no_grad():
        kd.kd_loss(s.clone().requires_grad_(True), t, backend="cpu")
    assert (counter.fused, counter.plain) == (1, 1)  # no gradient buffer under no_grad
    kd.kd_loss(s, t, backend="cpu")  # student without requires_grad
    assert (counter.fused, counter.plain) == (1, 2)
    x = s.clone().requires_grad_(True)
    kd.kd_loss(x, t, backend="cpu", grad_inplace=True).backward()
    assert (counter.fused, counter.plain) == (1, 3)


@pytest.fixture
def multiplies(monkeypatch):
    """Records, for each call of ops.dense.scale_rows, whether it had to multiply (it returns a
    new tensor) or handed the fused gradient on as it is."""
    calls, real = [], ops.scale_rows

    def counting(grad, grad_loss, grad_scale):
        out = real(grad, grad_loss, grad_scale)
        calls.append(out is not grad)
        return out
    monkeypatch.setattr(ops, "scale_rows", counting)
    return calls


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("extra", ["none", "labels", "num_items", "token_weights"])
def test_reductions_need_no_rescaling_pass(reduction, extra, multiplies):
    """The hint equals autograd's grad_loss bitwise: backward does not multiply."""
    s, t = logits((3, 4, 700), torch.float32), logits((3, 4, 700), torch.float32)
    labels = torch.randint(0, 700, (3, 4))
    labels[0, :2] = -100
    kw = {"labels": dict(labels=labels, hard_weight=0.3),
          "num_items": dict(labels=labels, num_items_in_batch=17),
          "token_weights": dict(token_weights=torch.rand(3, 4) + 0.1), "none": {}}[extra]
    if extra == "num_items" and reduction == "sum":  # refused since issue 21 (test_api.py)
        with pytest.raises(ValueError, match="num_items_in_batch"):
            _grad(s, t, temperature=1.0, reduction=reduction, **kw)
        return
    out, g = _grad(s, t, temperature=1.0, reduction=reduction, **kw)
    assert multiplies == [False]
    o_out, o_g = _oracle_grad(s, t, reduction=reduction, temperature=1.0, **kw)
    r_out, r_g = _ref_grad(s, t, reduction=reduction, temperature=1.0, **kw)
    assert_close(out, o_out, torch.float32, plain=r_out, what="loss")
    assert_close(g, o_g, torch.float32, plain=r_g, what="gradient")


# ---- against the oracle: every kernel divergence, dtype, masks, hard term -----------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.0])  # T = 1: hard term inside the fused kernel
def test_matrix_against_oracle(div, dtype, T, counter):
    B, L, V = 2, 3, 2600  # several 1024-column blocks, the last one partial
    s, t = logits((B, L, V), dtype), logits((B, L, V), dtype)
    labels = torch.randint(0, V, (B, L))
    labels[1, 0] = -100
    rows, g = check(s, t, **_kw(div, temperature=T, labels=labels, hard_weight=0.4,
                                soft_weight=0.7))
    assert counter.fused >= 1
    assert rows[1, 0] == 0 and (g[1, 0] == 0).all()


@pytest.mark.parametrize("div", DIVS)
def test_row_maximum_in_a_late_block(div):
    """The online pass rescales the exponentials of earlier blocks (per-block offsets)."""
    V = 5000
    s, t = logits((1, 4, V), torch.float32), logits((1, 4, V), torch.float32)
    ramp = torch.linspace(0, 30, V)
    s[0, 0] += ramp  # maxima rise block after block
    t[0, 1] += ramp
    s[0, 2, -1] = 60.0  # a single spike in the last (partial) block
    t[0, 3, 4500] = 50.0
    check(s, t, **_kw(div, temperature=1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_columns_shared(div, dtype):
    V = 2100
    s, t = logits((2, 2, V), dtype), logits((2, 2, V), dtype)
    cols = torch.tensor([0, 7, 1023, 1024, 2047, 2048, V - 1])
    s[..., cols] = float("-inf")
    t[..., cols] = float("-inf")
    s[1, 1, :1024] = float("-inf")  # a whole block of -inf (offset of an empty block)
    t[1, 1, :1024] = float("-inf")
    keep = torch.ones(V, dtype=torch.bool)
    keep[cols] = False
    # row [1, 1] has more -inf columns than `keep` drops: the oracle sees them as -inf too
    rows, _ = check(s, t, keep=keep, **_kw(div, temperature=1.0))
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_huge_logits(div, dtype):
    s, t = logits((2, 2, 1500), dtype, 1e4), logits((2, 2, 1500), dtype, 1e4)
    rows, _ = check(s, t, **_kw(div, temperature=2.0))
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_strided_views_and_padded_teacher(div, dtype):
    B, L, V, Vt = 2, 5, 1271, 1300
    s_full, t_full = logits((B, L + 1, V), dtype), logits((B, L + 1, Vt), dtype)
    s, t = s_full[:, :-1], t_full[:, 1:]
    labels = torch.randint(0, V, (B, L))
    labels[1, 3] = -100
    for T in (1.0, 3.0):
        check(s, t, **_kw(div, temperature=T, labels=labels, hard_weight=0.25))


def test_all_rows_ignored():
    s, t = logits((2, 3, 1100), torch.float32), logits((2, 3, 1100), torch.float32)
    s[0, 0] = float("nan")  # ignored rows may hold garbage
    labels = torch.full((2, 3), -100)
    for red in ("batchmean", "sum", "mean", "none"):
        out, g = _grad(s, t, labels=labels, hard_weight=1.0, reduction=red)
        assert (out == 0).all() and (g == 0).all() and not torch.isnan(g).any()


def test_nan_input_gives_nan():
    for div in DIVS:
        s, t = logits((1, 2, 1500), torch.float32), logits((1, 2, 1500), torch.float32)
        s[0, 0, 1200] = float("nan")
        x = s.clone().requires_grad_(True)
        rows = kd.kd_loss(x, t, reduction="none", backend="cpu", **_kw(div))
        assert torch.isnan(rows[0, 0]) and torch.isfinite(rows[0, 1]), div


# ---- grad_loss other than the hint --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "skew_reverse_kl"])
def test_scaled_loss(div, dtype, multiplies):
    s, t = logits((2, 3, 1500), dtype), logits((2, 3, 1500), dtype)
    labels = torch.randint(0, 1500, (2, 3))
    kw = _kw(div, temperature=1.0, labels=labels, hard_weight=0.5)
    x = s.detach().requires_grad_(True)
    (kd.kd_loss(x, t, backend="cpu", **kw) * 0.37).backward()
    assert multiplies == [True]
    o_out, o_g = _oracle_grad(s, t, scale=0.37, **kw)
    _, r_g = _ref_grad(s, t, scale=0.37, **kw)
    assert x.grad.dtype == dtype
    assert_close(x.grad, o_g, dtype, plain=r_g, what="gradient")


@pytest.mark.parametrize("div", DIVS)
def test_token_weights_and_random_upstream(div):
    s, t = logits((3, 4, 1300), torch.float32), logits((3, 4, 1300), torch.float32)
    w = torch.rand(3, 4)
    w[0, 1] = 0.0
    up = torch.randn(3, 4)
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, t, backend="cpu", reduction="none", token_weights=w, **_kw(div))
    (rows * up).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    okw = {k: v for k, v in _kw(div).items() if k != "divergence"}
    o_rows = oracle.rows(s64, t.double(), divergence_name=div, **okw)
    (o_g,) = torch.autograd.grad((o_rows * w.double() * up.double()).sum(), s64)
    y = s.detach().requires_grad_(True)
    r = kd.kd_loss(y, t, backend="reference", reduction="none", token_weights=w, **_kw(div))
    (r_g,) = torch.autograd.grad((r * up).sum(), y)
    assert_close(x.grad, o_g, torch.float32, plain=r_g, what="gradient")
    assert (x.grad[0, 1] == 0).all()


def test_retain_graph_second_backward():
    s, t = logits((2, 3, 1100), torch.float32), logits((2, 3, 1100), torch.float32)
    x = s.clone().requires_grad_(True)
    loss = kd.kd_loss(x, t, backend="cpu", temperature=2.0, divergence="jsd")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss * 2.0, x)  # second pass: the two-kernel path
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-5, atol=1e-9)


def test_matches_two_kernel_path():
    s, t = logits((2, 8, 3001), torch.float32), logits((2, 8, 3001), torch.float32)
    labels = torch.randint(0, 3001, (16,))
    for div in DIVS:
        d = divergences.get(div)
        args = (s, t, labels, "cpu", d.id, d.check_param(None), 1.0, 0.8, 0.3, -100)
        loss, g = kd_rows_with_grad(*args)
        loss2, stats = kd_rows(*args)
        g2 = kd_rows_backward(torch.ones(16), *args[:3], stats, *args[3:])
        torch.testing.assert_close(loss, loss2, rtol=2e-6, atol=1e-6)
        # Reverse KL: both paths form q (x - c') with c' summed from their own x, rounded against
        # per-block offsets (fused) or one row offset (two-kernel); where x - c' cancels the two
        # differ by up to ~2e-7 absolute (both are within 4e-7 of the float64 oracle here).
        atol = 1e-6 if div == "reverse_kl" else 1e-8
        torch.testing.assert_close(g, g2, rtol=1e-5, atol=atol)


# ---- op checks, threads -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_opcheck_kd_rows_with_grad(div, dtype):
    d = divergences.get(div)
    s = logits((2, 3, 129), dtype).requires_grad_(True)
    t = logits((2, 3, 140), dtype)[..., :129]
    lab = torch.randint(0, 129, (6,))
    lab[1] = -100
    scale = torch.rand(6) + 0.5
    for gs in (None, scale):
        args = (s, t, lab, "cpu", d.id, d.check_param(None), 1.0, 1.0, 0.5, -100, gs)
        torch.library.opcheck(kd_rows_with_grad, args)


def test_scale_rows_skips_and_scales():
    g = torch.randn(2, 3, 50)
    gl = torch.rand(6) + 0.5
    assert scale_rows(g, gl, gl.clone()) is g
    torch.testing.assert_close(scale_rows(g, gl, None), g * gl.view(2, 3, 1))
    gs = torch.rand(6) + 0.5
    torch.testing.assert_close(scale_rows(g, gl, gs), g * (gl / gs).view(2, 3, 1))
    gb = g.bfloat16()
    out = scale_rows(gb, gl, None)  # fp32 product, rounded once
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (gb.float() * gl.view(2, 3, 1)).bfloat16())


def test_compile_fullgraph():
    s, t = logits((2, 3, 300), torch.float32), logits((2, 3, 300), torch.float32)
    f = torch.compile(lambda a, b: kd.kd_loss(a, b, temperature=2.0, backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    x = s.clone().requires_grad_(True)
    f(x, t).backward()
    _, g = _grad(s, t, temperature=2.0)
    torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_independence_bitwise(dtype):
    """Each row is computed by one thread alone: 1 and 2 threads agree bitwise."""
    s, t = logits((4, 40, 2100), dtype), logits((4, 40, 2100), dtype)
    labels = torch.randint(0, 2100, (4, 40))
    out = {}
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for div in ("forward_kl", "jsd"):
                for T in (1.0, 2.0):
                    out[n, div, T] = _grad(s, t, labels=labels, hard_weight=0.5, temperature=T,
                                           reduction="sum", **_kw(div))
    finally:
        torch.set_num_threads(old)
    for key in [k for k in out if k[0] == 1]:
        a, b = out[key], out[(2,) + key[1:]]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), key
