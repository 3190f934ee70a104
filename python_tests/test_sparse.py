"""sparse_kd_loss (stored top-k teacher) against a float64 oracle on dense tensors.

The oracle below applies the definitions of kdkernels/losses/sparse.py to full [N, V] tensors, written
independently of the implementation: zero probabilities are a huge finite negative log (−1e300,
so exp gives exactly 0 and autograd stays finite), mixtures use logaddexp, the student's tail mass
is the direct sum of q over the columns outside the row's index set (no 1 − Σ cancellation), and
the teacher's tail is 1 − Σ of the given probabilities. Both tails are floored at 2⁻²⁴ (the
documented definition).
"""
import math

import pytest
import torch

import kdkernels
from kdkernels import backends, sparse_kd_loss
from conftest import TOL, assert_close, backend_params, cpu, device_for, kw_on, on

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
HUGE = 1e300
FLOOR = 2.0 ** -24


# ---- the oracle ---------------------------------------------------------------------------

def _kl(lx, ly):
    return (lx.exp() * (lx - ly)).sum(-1)


def _mix(w, la, lb):  # log(w e^la + (1-w) e^lb), smooth even where both are "zero"
    lw = math.log(w) if w > 0 else -math.inf
    return torch.logaddexp(la + lw, lb + math.log(1 - w)).clamp_min(-HUGE)


def _div(name, lp, lq, beta, alpha):
    if name == "forward_kl":
        return _kl(lp, lq)
    if name == "reverse_kl":
        return _kl(lq, lp)
    if name == "jsd":
        m = _mix(beta, lp, lq)
        return beta * _kl(lp, m) + (1 - beta) * _kl(lq, m)
    if name == "skew_kl":
        return _kl(lp, _mix(alpha, lp, lq))
    if name == "skew_reverse_kl":
        return _kl(lq, _mix(alpha, lq, lp))
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(name)


def oracle_rows(s, idx, lp, tail="renormalize", divergence="forward_kl", temperature=1.0,
                labels=None, ignore_index=-100, soft_weight=1.0, hard_weight=0.0, beta=0.5,
                alpha=0.1):
    """Per-row float64 loss (leading shape), differentiable w.r.t. ``s``."""
    V, K = s.shape[-1], idx.shape[-1]
    s2 = s.reshape(-1, V).double().clamp_min(-HUGE)
    idx2, lp2 = idx.reshape(-1, K), lp.reshape(-1, K).double()
    N = s2.shape[0]
    member = torch.zeros(N, V, dtype=torch.bool)
    lp_dense = torch.full((N, V), -HUGE, dtype=torch.float64)
    for r in range(N):
        for k in range(K):
            i, v = int(idx2[r, k]), float(lp2[r, k])
            if i != -1 and v != -math.inf:
                member[r, i] = True
                lp_dense[r, i] = v
    has = member.any(-1)
    T = float(temperature)
    logq = torch.log_softmax(s2 / T, dim=-1).clamp_min(-HUGE)
    lq = torch.where(member, logq, -HUGE)
    if tail == "renormalize":
        lq = lq - torch.logsumexp(lq, -1, keepdim=True)
        lpn = lp_dense - torch.logsumexp(lp_dense, -1, keepdim=True)
    else:
        q_tail = torch.logsumexp(torch.where(member, -HUGE, logq), -1, keepdim=True)
        p_tail = (1 - torch.where(member, lp_dense.exp(), 0.0).sum(-1, keepdim=True))
        lq = torch.cat([lq, q_tail.clamp_min(math.log(FLOOR))], -1)
        lpn = torch.cat([lp_dense, p_tail.clamp_min(FLOOR).log()], -1)
    d = torch.where(has, _div(divergence, lpn, lq, beta, alpha), 0.0)
    out = soft_weight * T * T * d
    if labels is not None:
        lab = labels.reshape(-1)
        keep = lab != ignore_index
        if hard_weight:
            ce = -torch.log_softmax(s2, -1).gather(1, torch.where(keep, lab, 0)[:, None])[:, 0]
            out = out + hard_weight * ce
        out = torch.where(keep, out, 0.0)
    return out.view(s.shape[:-1])


def oracle_loss_and_grad(s, idx, lp, reduction="batchmean", num_items_in_batch=None, **kw):
    x = s.detach().double().requires_grad_(True)
    r = oracle_rows(x, idx, lp, **kw)
    if reduction == "none":
        out = r
    elif reduction == "sum":
        out = r.sum()
    else:
        labels, ii = kw.get("labels"), kw.get("ignore_index", -100)
        n = num_items_in_batch if num_items_in_batch is not None else (
            r.numel() if labels is None else int((labels != ii).sum()))
        out = r.sum() / max(n, 1)
        if reduction == "mean":
            out = out / s.shape[-1]
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


# ---- backends -----------------------------------------------------------------------------

_CPU_REASON = backends.availability("cpu")
CPU = pytest.param("cpu", id="cpu", marks=[pytest.mark.skip(
    reason=f"C++ sparse kernels unavailable: {_CPU_REASON}")] if _CPU_REASON else [])
needs_cpu = pytest.mark.skipif(_CPU_REASON is not None,
                               reason=f"C++ sparse kernels unavailable: {_CPU_REASON}")


# ---- inputs -------------------------------------------------------------------------------

def make_case(B=2, L=5, V=37, K=6, T=2.0, dtype=torch.float32, ugly=True, seed=0):
    """Student [B, L, V] as the strided view x[:, :-1]; teacher top-k of a dense teacher."""
    g = torch.Generator().manual_seed(seed)
    s_full = torch.randn(B, L + 1, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    if ugly:
        t[0, 1, :V // 2] = -math.inf          # masked vocabulary, shared by teacher and student
        s_full[0, 1, :V // 2] = -math.inf
        t[1, 0, V - K // 2:] = -math.inf      # teacher masked where it would rank high: -inf slots
    lp_full = torch.log_softmax(t / T, dim=-1)
    lp, idx = lp_full.topk(K, dim=-1)
    if ugly:
        idx[0, 2, 1] = -1                     # unused slot by index
        idx[1, 3, :] = -1                     # a row without any teacher information
    s = s_full.to(dtype)[:, :-1]
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 0] = -100
    labels[1, 2] = int(idx[1, 2, 0])          # label among the top-k indices
    labels[0, 1] = V - 1                      # a finite student column (CE would be inf)
    return s, idx, lp.float(), labels


@pytest.fixture
def small_blocks(monkeypatch):
    """Several V-blocks and K-blocks in the Triton kernels on small shapes."""
    from kdkernels.backends.triton import sparse_launch
    monkeypatch.setattr(sparse_launch, "BLOCK_V", 16)
    monkeypatch.setattr(sparse_launch, "MAX_BLOCK_K", 16)


def _run(s, idx, lp, backend, **kw):
    """Loss and gradient (on the CPU), computed on the backend's device (conftest.device_for);
    a non-contiguous s [B, L, V] is passed as the view base[:, :-1]."""
    idx, lp, kw = on(backend, idx), on(backend, lp), kw_on(backend, kw)
    if s.is_contiguous():
        base = x = on(backend, s.detach().clone()).requires_grad_(True)
    else:
        base = torch.zeros(s.shape[0], s.shape[1] + 1, s.shape[2], dtype=s.dtype,
                           device=device_for(backend))
        base[:, :-1] = s
        base.requires_grad_(True)
        x = base[:, :-1]
    out = sparse_kd_loss(x, idx, lp, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.sum(), base)
    if x is not base:
        assert (g[:, -1] == 0).all()
        g = g[:, :-1]
    return cpu(out.detach()), cpu(g)


# ---- tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params("reference") + backend_params("triton") + [CPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_against_dense_oracle(tail, divergence, dtype, backend, small_blocks):
    s, idx, lp, labels = make_case(dtype=dtype)
    kw = dict(tail=tail, divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.5)
    pkw = {"beta": 0.3} if divergence == "jsd" else {"alpha": 0.2} if "skew" in divergence else {}
    okw = dict(beta=pkw.get("beta", 0.5), alpha=pkw.get("alpha", 0.1))
    for reduction in ("none", "batchmean"):
        out, g = _run(s, idx, lp, backend, reduction=reduction, **kw, **pkw)
        e_out, e_g = oracle_loss_and_grad(s, idx, lp, reduction=reduction, **kw, **okw)
        assert out.dtype == torch.float32 and g.dtype == dtype
        assert_close(out, e_out, dtype, what=f"loss {reduction}")
        assert_close(g, e_g, dtype, what=f"grad {reduction}")
        assert (g[0, 0] == 0).all(), "ignored row must get an exactly zero gradient"


@pytest.mark.parametrize("backend", ["reference", CPU])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVS)
def test_k_equals_v_matches_dense_kd_loss(divergence, dtype, tail, backend):
    """With every column stored, renormalize is exactly the dense loss (bucket: the tail is 0)."""
    V, T = 29, 1.5
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 4, V, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 4, V, generator=g) * 3).to(dtype)
    t[1, 2, :7] = -math.inf
    s[1, 2, :7] = -math.inf
    labels = torch.randint(0, V, (3, 4), generator=g)
    labels[2, 1] = -100
    lp, idx = torch.log_softmax(t.float() / T, -1).topk(V, dim=-1)
    kw = dict(divergence=divergence, temperature=T, labels=labels, hard_weight=0.25)
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    a = sparse_kd_loss(x1, idx, lp, tail=tail, **kw, backend=backend)
    b = kdkernels.kd_loss(x2, t, **kw, backend="reference")
    a.backward()
    b.backward()
    assert_close(a.detach(), b.detach(), torch.float32, what="loss")
    assert_close(x1.grad, x2.grad, dtype, what="grad")


@pytest.mark.parametrize("backend", ["reference"] + backend_params("triton") + [CPU])
def test_k_equals_one(backend):
    s, idx, lp, labels = make_case(K=1, ugly=False)
    x = on(backend, s.contiguous()).requires_grad_(True)
    # renormalize over one outcome: the soft loss and its gradient vanish
    out = sparse_kd_loss(x, *on(backend, idx, lp), tail="renormalize", temperature=2.0,
                         backend=backend)
    out.backward()
    assert float(out.detach()) == 0.0 and (x.grad == 0).all()
    for div in DIVS:
        o, gr = _run(s, idx, lp, backend, tail="bucket", divergence=div, temperature=2.0)
        e_o, e_g = oracle_loss_and_grad(s, idx, lp, tail="bucket", divergence=div, temperature=2.0)
        assert_close(o, e_o, torch.float32, what=f"{div} loss")
        assert_close(gr, e_g, torch.float32, what=f"{div} grad")


@pytest.mark.parametrize("backend", ["reference", CPU])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_unused_slots_are_the_same_as_absent_slots(tail, backend):
    s, idx, lp, _ = make_case(ugly=False, K=4)
    idx_pad = torch.cat([idx, torch.full_like(idx[..., :2], -1), idx[..., :1] * 0 + 3], -1)
    lp_pad = torch.cat([lp, lp[..., :2] * 0 + 1.0, torch.full_like(lp[..., :1], -math.inf)], -1)
    # slots 5-6: index -1 (value ignored); slot 7: log-prob -inf (index 3 then ignored, even if
    # another slot names column 3)
    for div in DIVS:
        a = sparse_kd_loss(s, idx, lp, tail=tail, divergence=div, reduction="none",
                           backend=backend)
        b = sparse_kd_loss(s, idx_pad, lp_pad, tail=tail, divergence=div, reduction="none",
                           backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference"] + backend_params("triton") + [CPU])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_all_rows_ignored(tail, backend):
    s, idx, lp, labels = make_case()
    s = s.contiguous()
    s[0, 0] = float("nan")  # garbage in an ignored row must not leak
    s, idx, lp = on(backend, s, idx, lp)
    s.requires_grad_(True)
    labels = on(backend, torch.full_like(labels, -100))
    for reduction in ("batchmean", "sum", "mean"):
        out = sparse_kd_loss(s, idx, lp, tail=tail, labels=labels, hard_weight=1.0,
                             reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(out, s)
        assert float(out.detach()) == 0.0 and (g == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "none"])
def test_reductions_and_num_items(reduction):
    s, idx, lp, labels = make_case()
    kw = dict(tail="bucket", divergence="jsd", temperature=0.7, labels=labels, hard_weight=0.3,
              soft_weight=0.6)
    nib = 13 if reduction == "batchmean" else None
    out, g = _run(s, idx, lp, "reference", reduction=reduction, num_items_in_batch=nib, **kw)
    e_out, e_g = oracle_loss_and_grad(s, idx, lp, reduction=reduction, num_items_in_batch=nib, **kw)
    assert_close(out, e_out, torch.float32, what="loss")
    assert_close(g, e_g, torch.float32, what="grad")


@pytest.mark.parametrize("backend", ["reference"] + backend_params("triton") + [CPU])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_large_logits(tail, backend):
    """|logits| ~ 1e4: one-hot-like distributions, compared per row."""
    g = torch.Generator().manual_seed(5)
    V, K = 40, 8
    s = torch.randn(6, V, generator=g) * 1e4
    t = torch.randn(6, V, generator=g, dtype=torch.float64) * 1e4
    t[:3] = s[:3].double() + torch.randn(3, V, generator=g, dtype=torch.float64)  # close rows
    lp, idx = torch.log_softmax(t / 3.0, -1).topk(K, dim=-1)
    lp = lp.float()
    for div in DIVS:
        out, gr = _run(s, idx, lp, backend, tail=tail, divergence=div, temperature=3.0,
                       reduction="none")
        e_out, e_g = oracle_loss_and_grad(s, idx, lp, tail=tail, divergence=div, temperature=3.0,
                                          reduction="none")
        assert torch.isfinite(out).all() and torch.isfinite(gr).all()
        # rows 0-2: teacher close to the student, losses near 0; rows 3-5: losses ~1e4. Each
        # group against its own scale, with an absolute floor of fp32 rounding on O(1) values.
        for rows in (slice(0, 3), slice(3, 6)):
            scale = max(float(e_out[rows].abs().max()), 1.0)
            torch.testing.assert_close(out[rows].double(), e_out[rows], rtol=0,
                                       atol=TOL[torch.float32] * scale)
            gscale = max(float(e_g[rows].abs().max()), 1.0)
            torch.testing.assert_close(gr[rows].double(), e_g[rows], rtol=0,
                                       atol=TOL[torch.float32] * gscale)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_gradcheck_float64(divergence, tail):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    lp, idx = torch.log_softmax(torch.randn(2, 3, 9, generator=g, dtype=torch.float64), -1).topk(4)
    labels = torch.tensor([[1, -100, 4], [0, 8, 2]])
    f = lambda x: sparse_kd_loss(x, idx, lp, tail=tail, divergence=divergence, temperature=1.3,
                                 labels=labels, hard_weight=0.4, reduction="sum")
    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("backend", ["reference", CPU])
def test_nan_in_counted_row_gives_nan(backend):
    s, idx, lp, labels = make_case()
    s = s.contiguous()
    s[1, 1, 3] = float("nan")
    for tail in ("renormalize", "bucket"):
        out = sparse_kd_loss(s, idx, lp, tail=tail, labels=labels, hard_weight=1.0,
                             reduction="none", backend=backend)
        assert torch.isnan(out[1, 1]) and not torch.isnan(out[0]).any()


def test_index_and_logprob_dtypes():
    s, idx, lp, labels = make_case(ugly=False)
    ref = sparse_kd_loss(s, idx, lp, tail="bucket")
    assert torch.equal(sparse_kd_loss(s, idx.int(), lp, tail="bucket"), ref)
    half = sparse_kd_loss(s, idx, lp.half(), tail="bucket")
    e, _ = oracle_loss_and_grad(s, idx, lp.half().float(), tail="bucket")
    assert_close(half, e, torch.float32, what="fp16 log-probs")


@pytest.mark.parametrize("backend", backend_params("triton") + [CPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_match_reference(dtype, backend, small_blocks):
    s, idx, lp, labels = make_case(V=45, K=21, dtype=dtype)
    for tail in ("renormalize", "bucket"):
        for hw, sw in ((0.0, 1.0), (1.0, 0.0), (0.5, 2.0)):
            kw = dict(tail=tail, divergence="reverse_kl", temperature=1.7, labels=labels,
                      hard_weight=hw, soft_weight=sw)
            a, ga = _run(s, idx, lp, "reference", **kw)
            b, gb = _run(s, idx, lp, backend, **kw)
            assert_close(b, a, dtype, what="loss")
            assert_close(gb, ga, dtype, what="grad")


def test_bad_inputs():
    s, idx, lp, labels = make_case(ugly=False)
    dup = idx.clone()
    dup[1, 2, 3] = dup[1, 2, 0]
    with pytest.raises(ValueError, match="duplicate index"):
        sparse_kd_loss(s, dup, lp)
    unused_dup = dup.clone()
    lp_u = lp.clone()
    lp_u[1, 2, 3] = -math.inf              # a duplicate in an unused slot is fine
    sparse_kd_loss(s, unused_dup, lp_u)
    big = idx.clone()
    big[0, 0, 0] = 37
    with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, 37\)"):
        sparse_kd_loss(s, big, lp)
    neg = idx.clone()
    neg[0, 0, 0] = -5
    with pytest.raises(ValueError, match="teacher_indices"):
        sparse_kd_loss(s, neg, lp)
    with pytest.raises(TypeError, match="teacher_indices must be an integer"):
        sparse_kd_loss(s, idx.float(), lp)
    with pytest.raises(TypeError, match="teacher_logprobs must be a floating"):
        sparse_kd_loss(s, idx, idx)
    with pytest.raises(TypeError, match="teacher_logprobs must be a torch.Tensor"):
        sparse_kd_loss(s, idx, lp.tolist())
    with pytest.raises(ValueError, match="differs from teacher_logprobs shape"):
        sparse_kd_loss(s, idx, lp[..., :-1])
    with pytest.raises(ValueError, match="leading shape of student_logits"):
        sparse_kd_loss(s, idx[:, :-1], lp[:, :-1])
    with pytest.raises(TypeError, match="student_logits must be a floating"):
        sparse_kd_loss(idx, idx, lp)
    with pytest.raises(ValueError, match="tail must be one of"):
        sparse_kd_loss(s, idx, lp, tail="drop")
    with pytest.raises(ValueError, match="not logits"):
        sparse_kd_loss(s, idx, lp + 3.0, tail="bucket")
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        sparse_kd_loss(s, idx, lp, hard_weight=1.0)
    with pytest.raises(ValueError, match="beta does not apply"):
        sparse_kd_loss(s, idx, lp, beta=0.3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sparse_kd_loss(s, idx, lp, temperature=0.0)
    with pytest.raises(ValueError, match="no sparse top-k kernel"):
        sparse_kd_loss(s, idx, lp, backend="cuda")
    if _CPU_REASON is None:
        with pytest.raises(TypeError, match="backend='cpu' does not accept torch.float64"):
            sparse_kd_loss(s.double(), idx, lp, backend="cpu")
    with pytest.raises(ValueError, match="labels must lie in"):
        sparse_kd_loss(s, idx, lp, labels=labels + 100, hard_weight=1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        sparse_kd_loss(s, idx, lp, divergence="kl")


def test_student_dtypes_fp16_and_auto_backend():
    s, idx, lp, labels = make_case(dtype=torch.float16)
    out, g = _run(s, idx, lp, "auto", tail="bucket", labels=labels, hard_weight=0.5)
    e, eg = oracle_loss_and_grad(s, idx, lp, tail="bucket", labels=labels, hard_weight=0.5)
    assert_close(out, e, torch.float16, what="loss")
    assert_close(g, eg, torch.float16, what="grad")


# ---- the C++ CPU kernels --------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_cpu_several_v_blocks(tail, dtype):
    """V = 5000: three column blocks of the C++ kernels (BLK = 2048), the last one partial."""
    s, idx, lp, labels = make_case(B=2, L=5, V=5000, K=16, dtype=dtype, seed=11)
    for div in ("forward_kl", "skew_reverse_kl"):
        kw = dict(tail=tail, divergence=div, temperature=1.7, labels=labels, hard_weight=0.5)
        out, g = _run(s, idx, lp, "cpu", reduction="none", **kw)
        e_out, e_g = oracle_loss_and_grad(s, idx, lp, reduction="none", **kw)
        assert_close(out, e_out, dtype, what=f"{div} loss")
        assert_close(g, e_g, dtype, what=f"{div} grad")
        assert (g[0, 0] == 0).all()


@needs_cpu
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_cpu_many_rows_over_threads(tail):
    """512 rows of V = 301: several row ranges per thread in at::parallel_for."""
    s, idx, lp, labels = make_case(B=4, L=128, V=301, K=8, seed=12)
    kw = dict(tail=tail, divergence="reverse_kl", temperature=2.0, labels=labels, hard_weight=0.3)
    out, g = _run(s, idx, lp, "cpu", reduction="none", **kw)
    e_out, e_g = oracle_loss_and_grad(s, idx, lp, reduction="none", **kw)
    assert_close(out, e_out, torch.float32, what="loss")
    assert_close(g, e_g, torch.float32, what="grad")


@needs_cpu
def test_cpu_2d_row_strided_view_and_v1():
    g = torch.Generator().manual_seed(13)
    wide = torch.randn(7, 50, generator=g).requires_grad_(True)
    x = wide[:, :41]                       # [N, V] with row stride 50 > V, used without a copy
    lp, idx = torch.log_softmax(torch.randn(7, 41, generator=g) / 2.0, -1).topk(5)
    labels = torch.randint(0, 41, (7,), generator=g)
    for tail in ("renormalize", "bucket"):
        kw = dict(tail=tail, divergence="tvd", temperature=2.0, labels=labels, hard_weight=1.0)
        a = sparse_kd_loss(x, idx, lp, backend="cpu", **kw)
        (gw,) = torch.autograd.grad(a, wide)
        assert (gw[:, 41:] == 0).all()
        ga = gw[:, :41]
        e, eg = oracle_loss_and_grad(x, idx, lp, **kw)
        assert_close(a, e, torch.float32, what="loss")
        assert_close(ga, eg, torch.float32, what="grad")
    # V = 1, K = 1: the single column holds all the mass on both sides
    s1 = torch.randn(3, 1, generator=g)
    for tail in ("renormalize", "bucket"):
        o, g1 = _run(s1, torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, 1), "cpu", tail=tail,
                     labels=torch.zeros(3, dtype=torch.int64), hard_weight=1.0)
        assert abs(float(o)) < 1e-6 and g1.abs().max() < 1e-6


@needs_cpu
def test_cpu_auto_choice():
    from kdkernels.backends import choose as _choose_backend
    cpu = torch.device("cpu")
    assert _choose_backend("auto", cpu, torch.float32) == "cpu"
    assert _choose_backend("auto", cpu, torch.bfloat16) == "cpu"
    assert _choose_backend("auto", cpu, torch.float64) == "reference"


def _op_case(dtype):
    g = torch.Generator().manual_seed(14)
    s = (torch.randn(2, 4, 23, generator=g) * 2).to(dtype)[:, :3]   # row-strided view
    idx = torch.randint(0, 23, (6, 5), generator=g)
    idx = torch.stack([torch.randperm(23, generator=g)[:5] for _ in range(6)])
    idx[1, 2] = -1
    labels = torch.tensor([0, 22, -100, 4, 7, 23])                   # out-of-range: no column
    return s, idx, labels


@needs_cpu
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["BA", "B", "A", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck_sparse_ops(dtype, need):
    need_b, need_a = need
    s, idx, labels = _op_case(dtype)
    lab = labels if need_a else None
    ops = torch.ops.kdkernels_C
    torch.library.opcheck(ops.sparse_stats.default, (s, idx, lab, 1.5, need_b, need_a))
    stats, gathered = ops.sparse_stats(s, idx, lab, 1.5, need_b, need_a)
    s32 = s.float().reshape(6, 23)
    exp_g = torch.where(idx >= 0, s32.gather(1, idx.clamp_min(0)), 0.0)
    torch.testing.assert_close(gathered, exp_g, rtol=0, atol=0)
    if need_b:
        torch.testing.assert_close(stats[:, 0], torch.logsumexp(s32 * (1 / 1.5), 1))
    if need_a:
        torch.testing.assert_close(stats[:, 1], torch.logsumexp(s32, 1))
    g = torch.Generator().manual_seed(15)
    c_b, c_a, g_lab = (torch.randn(6, generator=g) for _ in range(3))
    c_b[2] = 0.0
    g_idx = torch.randn(6, 5, generator=g)
    args = (s, stats, idx, lab, 1.5, need_b, need_a, c_b, c_a, g_idx, g_lab)
    torch.library.opcheck(ops.sparse_grad.default, args)
    grad = ops.sparse_grad(*args)
    assert grad.dtype == dtype and grad.shape == s.shape and grad.is_contiguous()
    # the same contract in plain PyTorch (fp32)
    exp = torch.zeros(6, 23)
    if need_b:
        exp += torch.where(c_b[:, None] != 0, c_b[:, None] * torch.exp(s32 / 1.5 - stats[:, :1]), 0.0)
    if need_a:
        exp += c_a[:, None] * torch.exp(s32 - stats[:, 1:2])
        ok = (labels >= 0) & (labels < 23)
        exp.scatter_add_(1, torch.where(ok, labels, 0)[:, None], torch.where(ok, g_lab, 0.0)[:, None])
    exp.scatter_add_(1, idx.clamp_min(0), torch.where(idx >= 0, g_idx, 0.0))
    assert_close(grad.float().reshape(6, 23), exp, dtype, what="grad")


@needs_cpu
def test_sparse_op_bad_arguments():
    s, idx, labels = _op_case(torch.float32)
    ops = torch.ops.kdkernels_C
    with pytest.raises(TypeError, match="idx must be int64"):
        ops.sparse_stats(s, idx.int(), None, 1.0, True, False)
    with pytest.raises(TypeError, match="student dtype"):
        ops.sparse_stats(s.double(), idx, None, 1.0, True, False)
    with pytest.raises(ValueError, match="idx must be a contiguous"):
        ops.sparse_stats(s, idx[:3], None, 1.0, True, False)
    with pytest.raises(ValueError, match="need_a requires labels"):
        ops.sparse_stats(s, idx, None, 1.0, False, True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.sparse_stats(s, idx, None, 0.0, True, False)


@needs_cpu
def test_cpu_compile_fullgraph():
    s, idx, lp, labels = make_case(ugly=False)
    s = s.contiguous()
    kw = dict(tail="bucket", divergence="jsd", temperature=2.0, labels=labels, hard_weight=0.5,
              backend="cpu")
    f = torch.compile(lambda x: sparse_kd_loss(x, idx, lp, **kw), fullgraph=True,
                      backend="aot_eager")
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    a = f(x1)
    b = sparse_kd_loss(x2, idx, lp, **kw)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_cuda_triton_large_vocab(tail):
    V, K = 128256, 64
    s = (torch.randn(64, V, device="cuda") * 3).bfloat16()
    lp, idx = torch.log_softmax(torch.randn(64, V, device="cuda") * 3, -1).topk(K)
    labels = torch.randint(0, V, (64,), device="cuda")
    out, g = _run(s, idx, lp, "triton", tail=tail, labels=labels, hard_weight=0.5, temperature=2.0)
    e, eg = _run(s, idx, lp, "reference", tail=tail, labels=labels, hard_weight=0.5, temperature=2.0)
    assert_close(out, e, torch.bfloat16, what="loss")
    assert_close(g, eg, torch.bfloat16, what="grad")


_AOT_SCRIPT = r'''
import inspect, json, sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from kdkernels.backends.triton import sparse_kernels as K
from kdkernels.backends.triton import sparse_launch as SL
c = {"s_ptr": "*bf16", "stride_b": "i64", "stride_l": "i64", "L": "i32", "V": "i32",
     "stats_ptr": "*fp32", "inv_t": "fp32", "NEED_B": "constexpr", "NEED_A": "constexpr",
     "idx_ptr": "*i64", "K": "i32", "lab_ptr": "*i64", "gath_ptr": "*fp32", "grad_ptr": "*bf16",
     "cb_ptr": "*fp32", "ca_ptr": "*fp32", "gidx_ptr": "*fp32", "glab_ptr": "*fp32",
     "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"}
cx = {"NEED_B": True, "NEED_A": True, "BLOCK_V": SL.BLOCK_V, "BLOCK_K": 64}
out = {}
for fn in (K.sparse_stats_kernel, K.sparse_grad_dense_kernel, K.sparse_grad_fixup_kernel):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: c[n] for n in names}
    for cc in (80, 90):
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={n: v for n, v in cx.items() if n in sig}),
                           target=GPUTarget("cuda", cc, 32), options={"num_warps": SL.NUM_WARPS})
        path = sys.argv[1] + f"/{fn.fn.__name__}_{cc}.ptx"
        open(path, "w").write(k.asm["ptx"])
        out[path] = cc
print(json.dumps(out))
'''


def test_triton_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """The interpreter checks the math; this checks the kernels compile for real GPUs at the
    default launch configuration (BLOCK_V, bf16) and that ptxas reports no spills."""
    import json
    import os
    import re
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(tmp_path)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(ptx) == 6
    nvcc = shutil.which("nvcc")
    ptxas = os.path.join(os.path.dirname(nvcc), "ptxas") if nvcc else shutil.which("ptxas")
    assert ptxas and os.path.exists(ptxas), "ptxas (next to nvcc, PLATFORM.md) not found"
    for path, cc in ptx.items():
        arch = "sm_90a" if cc == 90 else "sm_80"
        rep = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300)
        assert rep.returncode == 0, rep.stderr
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill", rep.stderr)]
        assert spills and max(spills) == 0, f"{path}: {rep.stderr}"


# ---- indices the CPU checks refuse, straight into the Triton launcher (issue 16) ----------------

@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_launcher_masks_out_of_range_indices(backend, small_blocks):
    """Indices >= V and < -1 (refused by the CPU checks, possible on GPU where the loss does not
    synchronise to check them) are never read or written: their gathered value is NaN, the other
    slots and rows are exact, and the gradient equals the one with those slots unused."""
    from kdkernels.backends.triton import sparse_launch
    from kdkernels.backends import reference
    dev = device_for(backend)
    g = torch.Generator().manual_seed(3)
    B, L, V, K = 2, 3, 40, 20
    base = torch.randn(B, L + 2, V, generator=g)
    s3 = base[:, 1:-1].to(dev)  # rows in the middle of a buffer: a stray write would show
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * L)])
    bad = idx.clone()
    bad[0, 3], bad[1, 0], bad[2, K - 1], bad[4, 5] = V, V + 1000, -7, 1 << 40
    bad, idx = bad.to(dev), idx.to(dev)
    labels = torch.randint(0, V, (B * L,), generator=g).to(dev)
    stats, gath = sparse_launch.sparse_stats(s3, bad, labels, 2.0, True, True)
    e_stats, e_gath = reference.sparse_stats(s3, torch.where((bad >= 0) & (bad < V), bad, -1),
                                             labels, 2.0, True, True)
    oob = ((bad < -1) | (bad >= V)).cpu()
    gath, e_gath = cpu(gath), cpu(e_gath)
    assert torch.isnan(gath[oob]).all() and oob.sum() == 4
    torch.testing.assert_close(gath[~oob], e_gath[~oob].float())
    torch.testing.assert_close(cpu(stats), cpu(e_stats).float())
    n = B * L
    c_b, c_a, g_lab = (torch.randn(n, generator=g).to(dev) for _ in range(3))
    g_idx = torch.randn(n, K, generator=g).to(dev)
    grad = sparse_launch.sparse_grad(s3, stats, bad, labels, 2.0, True, True, c_b, c_a, g_idx,
                                     g_lab)
    clean = torch.where((bad >= 0) & (bad < V), bad, -1)
    e_grad = sparse_launch.sparse_grad(s3, stats, clean, labels, 2.0, True, True, c_b, c_a, g_idx,
                                       g_lab)
    assert torch.equal(cpu(grad), cpu(e_grad))


def test_out_of_range_and_duplicate_rows_give_nan_on_gpu_path():
    """What a GPU call gets instead of the CPU ValueError: a NaN loss for the offending row
    (device-side detection: duplicate_rows sorts the indices, no host synchronisation)."""
    from kdkernels.losses.sparse import duplicate_rows
    idx = torch.tensor([[1, 2, 3], [4, 4, -1], [-1, -1, 5], [7, 8, 7]])
    used = idx != -1
    used[3, 2] = False  # an unused slot may repeat a column
    assert duplicate_rows(idx, used).tolist() == [False, True, False, False]
    if torch.cuda.is_available():
        s = torch.randn(2, 10, device="cuda")
        ids = torch.tensor([[1, 2], [3, 3]], device="cuda")
        out = sparse_kd_loss(s, ids, torch.full((2, 2), -0.7, device="cuda"), reduction="none")
        assert torch.isfinite(out[0]) and torch.isnan(out[1])
        ids = torch.tensor([[1, 12], [3, 4]], device="cuda")
        out = sparse_kd_loss(s, ids, torch.full((2, 2), -0.7, device="cuda"), reduction="none")
        assert torch.isnan(out[0]) and torch.isfinite(out[1])
