"""fused_linear_kd_loss against a float64 oracle that materializes the logits.

The oracle is python_tests/oracle.py applied to hidden @ weightᵀ + bias (soft-capped where asked)
in float64; gradients w.r.t. the student hidden states, weight and bias come from autograd on it.
"""
import math

import pytest
import torch

import kdkernels as kd
from kdkernels import divergences as D
from kdkernels.losses import fused_linear as FL
from kdkernels.ops import fused_linear as FLO
from kdkernels.checks import compute_dtype
from kdkernels.tools import eager

import oracle
from conftest import assert_close, backend_params, cpu, on

N, DS, DT, V, VT = 37, 24, 40, 1271, 1300  # odd sizes; VT > V: padded teacher vocabulary


def make(n=N, ds=DS, dt=DT, v=V, vt=VT, dtype=torch.float32, bias=True, lead=None, scale=1.0):
    """Random student/teacher linear heads whose logits have a spread of a few units (x scale)."""
    lead = (n,) if lead is None else lead
    hs = torch.randn(*lead, ds, dtype=torch.float64)
    ws = torch.randn(v, ds, dtype=torch.float64) * (2.0 * scale / math.sqrt(ds))
    ht = torch.randn(*lead, dt, dtype=torch.float64)
    wt = torch.randn(vt, dt, dtype=torch.float64) * (2.0 * scale / math.sqrt(dt))
    bs = torch.randn(v, dtype=torch.float64) * scale if bias else None
    bt = torch.randn(vt, dtype=torch.float64) * scale if bias else None
    cast = (lambda x: None if x is None else x.to(dtype))
    return [cast(x) for x in (hs, ws, bs, ht, wt, bt)]


def labels_for(lead, v=V, every=4):
    lab = torch.randint(0, v, lead)
    lab.view(-1)[::every] = -100
    return lab


def oracle_fused(hs, ws, bs, ht, wt, bt, softcap=None, reduction="batchmean",
                 num_items_in_batch=None, **kw):
    """float64 loss and gradients (hidden, weight, bias) with the logits materialized."""
    h = hs.detach().double().requires_grad_(True)
    w = ws.detach().double().requires_grad_(True)
    b = None if bs is None else bs.detach().double().requires_grad_(True)
    s = h @ w.t() + (0.0 if b is None else b)
    t = ht.double() @ wt.double().t() + (0.0 if bt is None else bt.double())
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
    out = oracle.loss(s, t, reduction=reduction, num_items_in_batch=num_items_in_batch, **kw)
    grads = torch.autograd.grad(out.sum(), [x for x in (h, w, b) if x is not None])
    return out.detach(), list(grads)


def plain_fused(hs, ws, bs, ht, wt, bt, divergence, reduction="batchmean", softcap=None,
                **kw):
    """Plain PyTorch in the input dtype (logits materialized, eager formula, autograd): the
    yardstick of the three-way error bound."""
    h = hs.detach().clone().requires_grad_(True)
    w = ws.detach().clone().requires_grad_(True)
    b = None if bs is None else bs.detach().clone().requires_grad_(True)
    s = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    t = ht @ wt.t() if bt is None else torch.addmm(bt, ht, wt.t())
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
    out = eager.eager_kd_loss(s, t, divergence, reduction=reduction, **kw)
    grads = torch.autograd.grad(out.sum(), [x for x in (h, w, b) if x is not None])
    return out.detach(), list(grads)


def run(hs, ws, bs, ht, wt, bt, **kw):
    h = hs.detach().clone().requires_grad_(True)
    w = ws.detach().clone().requires_grad_(True)
    b = None if bs is None else bs.detach().clone().requires_grad_(True)
    out = kd.fused_linear_kd_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt, **kw)
    grads = torch.autograd.grad(out.sum(), [x for x in (h, w, b) if x is not None])
    return out.detach(), list(grads)


def check(actual, expected, dtype, plain=None, what=""):
    (la, ga), (le, ge) = actual, expected
    assert la.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(la, le, dtype, None if plain is None else plain[0], what=f"{what} loss")
    for name, a, e, p in zip(("hidden", "weight", "bias"), ga, ge,
                             [None] * 3 if plain is None else plain[1]):
        assert_close(a, e, dtype, p, what=f"{what} grad {name}")


def oracle_kw(divergence, beta=None, alpha=None, **kw):
    d = {"divergence_name": divergence, **kw}
    if beta is not None:
        d["beta"] = beta
    if alpha is not None:
        d["alpha"] = alpha
    return d


PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


# ---- correctness -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton"))
@pytest.mark.parametrize("divergence", D.names())  # logit_mse included (its own kernels)
def test_every_divergence_with_hard_loss_bias_padding(backend, divergence):
    x = make()
    lab = labels_for((N,))
    p = PARAMS.get(divergence, {})
    kw = dict(temperature=2.0, labels=lab, soft_weight=0.7, hard_weight=0.4)
    loss, grads = run(*on(backend, *x), divergence=divergence, backend=backend, chunk_size=10,
                      **{**kw, "labels": on(backend, lab)}, **p)
    got = (cpu(loss), [cpu(g) for g in grads])
    exp = oracle_fused(*x, **oracle_kw(divergence, **kw, **p))
    check(got, exp, torch.float32, what=f"{backend}/{divergence}")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_float64_matches_oracle_tightly(divergence):
    x = make(dtype=torch.float64)
    p = PARAMS.get(divergence, {})
    got = run(*x, divergence=divergence, temperature=1.5, chunk_size=8, **p)
    exp = oracle_fused(*x, **oracle_kw(divergence, temperature=1.5, **p))
    check(got, exp, torch.float64, what=divergence)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_reductions(reduction, with_labels):
    x = make()
    lab = labels_for((N,)) if with_labels else None
    got = run(*x, labels=lab, reduction=reduction, chunk_size=16, temperature=2.0)
    exp = oracle_fused(*x, reduction=reduction, **oracle_kw("forward_kl", labels=lab,
                                                             temperature=2.0))
    check(got, exp, torch.float32, what=reduction)


@pytest.mark.parametrize("num_items", [50, 50.0, torch.tensor(50)])
def test_num_items_in_batch(num_items):
    x = make()
    lab = labels_for((N,))
    got = run(*x, labels=lab, num_items_in_batch=num_items, chunk_size=9)
    exp = oracle_fused(*x, num_items_in_batch=50, **oracle_kw("forward_kl", labels=lab))
    check(got, exp, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_softcap(dtype, reduction):
    x = make(dtype=dtype, scale=4.0)  # logits well beyond the cap: tanh saturates
    lab = labels_for((N,))
    kw = dict(labels=lab, hard_weight=0.3, temperature=2.0)
    got = run(*x, divergence="reverse_kl", softcap=6.0, reduction=reduction, chunk_size=11, **kw)
    exp = oracle_fused(*x, softcap=6.0, reduction=reduction, **oracle_kw("reverse_kl", **kw))
    check(got, exp, dtype, what="softcap")
    plain = run(*x, divergence="reverse_kl", reduction=reduction, chunk_size=11, **kw)
    assert (plain[0] - got[0]).abs().max() > 1e-3  # the cap changes the loss


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("softcap", [None, 8.0])
def test_bfloat16_within_bound_of_plain_pytorch(divergence, softcap):
    x = make(dtype=torch.bfloat16)
    lab = labels_for((N,))
    p = PARAMS.get(divergence, {})
    kw = dict(temperature=2.0, labels=lab, hard_weight=0.5)
    got = run(*x, divergence=divergence, softcap=softcap, chunk_size=16, **kw, **p)
    exp = oracle_fused(*x, softcap=softcap, **oracle_kw(divergence, **kw, **p))
    plain = plain_fused(*x, divergence, softcap=softcap, **kw, **p)
    assert got[1][0].dtype == torch.bfloat16 and got[1][1].dtype == torch.bfloat16
    check(got, exp, torch.bfloat16, plain, what=f"bf16 {divergence}")


def test_bfloat16_weight_grad_in_weight_dtype():
    x = make(dtype=torch.bfloat16)
    exp = oracle_fused(*x, **oracle_kw("forward_kl"))
    plain = plain_fused(*x, "forward_kl")
    got = run(*x, chunk_size=5, grad_weight_dtype=None)
    check(got, exp, torch.bfloat16, plain, what="bf16 accumulation")


@pytest.mark.parametrize("chunk", [1, 7, 36, 37, 1000, None])
def test_chunk_sizes_agree(chunk):
    x = make()
    lab = labels_for((N,))
    got = run(*x, labels=lab, chunk_size=chunk, divergence="tvd")
    exp = oracle_fused(*x, **oracle_kw("tvd", labels=lab))
    check(got, exp, torch.float32, what=f"chunk {chunk}")


def test_leading_shape_and_strided_views():
    B, L = 3, 14
    hs, ws, bs, ht, wt, bt = make(lead=(B, L))
    lab = labels_for((B, L))
    # drop the last position, as a causal LM does: non-contiguous [B, L-1, D] views
    hsv, htv, labv = hs[:, :-1], ht[:, :-1], lab[:, :-1]
    got_none = kd.fused_linear_kd_loss(hsv, ws, htv, wt, student_bias=bs, teacher_bias=bt,
                                       labels=labv, reduction="none", chunk_size=8)
    assert got_none.shape == (B, L - 1)
    exp_none, _ = oracle_fused(hsv, ws, bs, htv, wt, bt, reduction="none",
                               **oracle_kw("forward_kl", labels=labv))
    assert_close(got_none, exp_none, torch.float32)
    h = hs.clone().requires_grad_(True)
    out = kd.fused_linear_kd_loss(h[:, :-1], ws, htv, wt, student_bias=bs, teacher_bias=bt,
                                  labels=labv, chunk_size=8)
    (gh,) = torch.autograd.grad(out, h)
    exp, (egh, _, _) = oracle_fused(hsv, ws, bs, htv, wt, bt, **oracle_kw("forward_kl",
                                                                           labels=labv))
    assert_close(out, exp, torch.float32)
    assert_close(gh[:, :-1], egh, torch.float32)
    assert torch.equal(gh[:, -1], torch.zeros_like(gh[:, -1]))


def test_all_rows_ignored_gives_zero_not_nan():
    x = make()
    lab = torch.full((N,), -100)
    for reduction in ("batchmean", "sum", "mean"):
        loss, grads = run(*x, labels=lab, hard_weight=1.0, reduction=reduction, chunk_size=10)
        assert loss.item() == 0.0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


def test_ignored_rows_with_non_finite_hidden_do_not_leak():
    hs, ws, bs, ht, wt, bt = make()
    lab = labels_for((N,))
    ign = lab == -100
    hs, ht = hs.clone(), ht.clone()
    hs[ign] = float("nan")
    ht[ign] = float("inf")
    got = run(hs, ws, bs, ht, wt, bt, labels=lab, hard_weight=0.5, chunk_size=10)
    keep = ~ign
    exp = oracle_fused(hs[keep], ws, bs, ht[keep], wt, bt,
                       num_items_in_batch=int(keep.sum()),
                       **oracle_kw("forward_kl", labels=lab[keep], hard_weight=0.5))
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1])
    assert torch.equal(got[1][0][ign], torch.zeros_like(got[1][0][ign]))
    assert_close(got[0], exp[0], torch.float32)
    assert_close(got[1][0][keep], exp[1][0], torch.float32)
    assert_close(got[1][1], exp[1][1], torch.float32)
    assert_close(got[1][2], exp[1][2], torch.float32)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_masked_vocabulary_and_huge_logits(divergence):
    # −inf bias on columns shared by teacher and student (masked vocabulary entries), and
    # logits of magnitude ~1e4. The oracle's jsd gradient is NaN wherever a float64 probability
    # underflows to exactly 0, so jsd gets large logits (~1e2) without masked columns.
    hs, ws, bs, ht, wt, bt = make(scale=30.0 if divergence == "jsd" else 3000.0)
    bs, bt = bs.clone(), bt.clone()
    cols = torch.tensor([0, 5, 600, V - 1])
    if divergence != "jsd":
        bs[cols] = float("-inf")
        bt[cols] = float("-inf")
    lab = labels_for((N,))
    lab[torch.isin(lab, cols)] = 1
    p = PARAMS.get(divergence, {})
    kw = dict(labels=lab, hard_weight=0.2, temperature=3.0, **p)
    got = run(hs, ws, bs, ht, wt, bt, divergence=divergence, chunk_size=16, **kw)
    exp = oracle_fused(hs, ws, bs, ht, wt, bt, **oracle_kw(divergence, **kw))
    plain = plain_fused(hs, ws, bs, ht, wt, bt, divergence, **kw)
    if divergence != "jsd":
        assert torch.equal(got[1][2][cols], torch.zeros(len(cols)))
    check(got, exp, torch.float32, plain, what=divergence)


def test_teacher_gets_no_gradient_and_frozen_weight():
    hs, ws, bs, ht, wt, bt = make()
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    h = hs.clone().requires_grad_(True)  # student weight frozen (e.g. LoRA): only hidden grads
    out = kd.fused_linear_kd_loss(h, ws, ht, wt, student_bias=bs, teacher_bias=bt, chunk_size=10)
    out.backward()
    assert ht.grad is None and wt.grad is None and ws.grad is None
    exp, (egh, _, _) = oracle_fused(hs, ws, bs, ht, wt, bt, **oracle_kw("forward_kl"))
    assert_close(h.grad, egh, torch.float32)


def test_no_grad_and_module():
    x = make()
    hs, ws, bs, ht, wt, bt = x
    lab = labels_for((N,))
    crit = kd.FusedLinearKDLoss(divergence="skew_kl", alpha=0.2, temperature=2.0, chunk_size=9)
    with torch.no_grad():
        a = crit(hs, ws, ht, wt, lab, student_bias=bs, teacher_bias=bt)
    exp, _ = oracle_fused(*x, **oracle_kw("skew_kl", alpha=0.2, temperature=2.0, labels=lab))
    assert_close(a, exp, torch.float32)
    b = crit(hs, ws.requires_grad_(True), ht, wt, lab, student_bias=bs, teacher_bias=bt)
    assert b.requires_grad and torch.allclose(a, b.detach())


def test_teacher_in_another_dtype():
    hs, ws, bs, ht, wt, bt = make()
    lab = labels_for((N,))
    got = run(hs, ws, bs, ht.double(), wt.double(), bt.double(), labels=lab, chunk_size=12)
    exp = oracle_fused(hs, ws, bs, ht, wt, bt, **oracle_kw("forward_kl", labels=lab))
    check(got, exp, torch.float32)


def test_empty_input():
    hs, ws, bs, ht, wt, bt = make(lead=(0,))
    loss, grads = run(hs, ws, bs, ht, wt, bt)
    assert loss.item() == 0.0 and grads[0].shape == (0, DS)
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_auto_chunk_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert FL.auto_chunk_size(100, 32000, cpu) == 100
    c = FL.auto_chunk_size(1 << 20, 32000, cpu)
    assert c == 131 and c * 32000 * 4 <= FL.CHUNK_BUFFER_BYTES["cpu"]
    assert FL.auto_chunk_size(1 << 20, 128256, cpu) == 128  # the GEMM floor wins over the budget
    assert FL.auto_chunk_size(8192, 128256, cuda) == 1024
    assert FL.auto_chunk_size(500, 128256, cuda) == 500
    assert 0 <= FL.CHUNK_BUFFER_BYTES["cuda"] - FL.auto_chunk_size(1 << 20, 1000, cuda) * 4000 < 4000
    assert FL.auto_chunk_size(0, 1000, cpu) == 1


# ---- ops: opcheck, gradcheck, torch.compile --------------------------------------------------

def _op_args(dtype, bias=True, labels=True):
    hs, ws, bs, ht, wt, bt = make(n=6, ds=5, dt=4, v=9, vt=11, dtype=dtype, bias=bias)
    lab = labels_for((6,), v=9, every=3) if labels else None
    return hs, ws, bs, ht, wt, bt, lab


def test_opcheck_ops():
    scal = ("reference", D.get("jsd").id, 0.4, 2.0, 1.0, 0.5, -100, 5.0, 4, True)
    for dtype in (torch.float32, torch.float64):
        hs, ws, bs, ht, wt, bt, lab = _op_args(dtype)
        hs.requires_grad_(True)
        ws.requires_grad_(True)
        bs.requires_grad_(True)
        scale = torch.tensor(0.25, dtype=compute_dtype(dtype))
        torch.library.opcheck(FLO.fused_linear_kd,
                              (hs, ws, bs, ht, wt, bt, lab, scale) + scal + (True, True, True))
        torch.library.opcheck(FLO.fused_linear_kd_rows, (hs, ws, bs, ht, wt, bt, lab) + scal)
        g = torch.randn(6, dtype=compute_dtype(dtype))
        torch.library.opcheck(FLO.fused_linear_kd_rows_backward,
                              (g, hs.detach(), ws.detach(), bs.detach(), ht, wt, bt, lab) + scal
                              + (True, False, True))
    hs, ws, _, ht, wt, _, _ = _op_args(torch.float32, bias=False, labels=False)
    torch.library.opcheck(FLO.fused_linear_kd_rows, (hs.requires_grad_(True), ws, None, ht, wt,
                                                    None, None) + scal)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_float64(reduction):
    hs, ws, bs, ht, wt, bt, lab = _op_args(torch.float64)
    hs, ws, bs = (x.requires_grad_(True) for x in (hs, ws, bs))

    def f(h, w, b):
        return kd.fused_linear_kd_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt, labels=lab,
                                       divergence="jsd", temperature=2.0, hard_weight=0.5,
                                       softcap=3.0, reduction=reduction, chunk_size=4)
    assert torch.autograd.gradcheck(f, (hs, ws, bs), fast_mode=True)


def test_torch_compile_fullgraph():
    x = make(n=12, v=50, vt=53)
    hs, ws, bs, ht, wt, bt = x
    lab = labels_for((12,), v=50)

    def f(h, w, b):
        return kd.fused_linear_kd_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt,
                                       labels=lab, temperature=2.0, hard_weight=0.5,
                                       chunk_size=5)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    exp = oracle_fused(hs, ws, bs, ht, wt, bt, **oracle_kw("forward_kl", labels=lab,
                                                            temperature=2.0, hard_weight=0.5))
    check((out.detach(), list(grads)), exp, torch.float32, what="compiled")


# ---- bad inputs ------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    hs, ws, bs, ht, wt, bt = make()
    f = kd.fused_linear_kd_loss
    with pytest.raises(ValueError, match="student_hidden width"):
        f(hs[:, :-1], ws, ht, wt)
    with pytest.raises(ValueError, match="teacher_hidden width"):
        f(hs, ws, ht, wt[:, :-1])
    with pytest.raises(ValueError, match="teacher_weight vocabulary"):
        f(hs, ws, ht, wt[:V - 1])
    with pytest.raises(ValueError, match="leading shape"):
        f(hs, ws, ht[:-1], wt)
    with pytest.raises(TypeError, match="student_weight dtype"):
        f(hs, ws.double(), ht, wt)
    with pytest.raises(TypeError, match="teacher_weight dtype"):
        f(hs, ws, ht.half(), wt)
    with pytest.raises(TypeError, match="student_hidden must be a floating-point"):
        f(hs.long(), ws, ht, wt)
    with pytest.raises(TypeError, match="teacher_hidden must be a torch.Tensor"):
        f(hs, ws, ht.tolist(), wt)
    with pytest.raises(ValueError, match="student_weight must have 2"):
        f(hs, ws[None], ht, wt)
    with pytest.raises(ValueError, match="student_bias must have shape"):
        f(hs, ws, ht, wt, student_bias=bs[:-1])
    with pytest.raises(ValueError, match="teacher_bias must have shape"):
        f(hs, ws, ht, wt, teacher_bias=bt[:V])
    with pytest.raises(ValueError, match="labels must have the leading shape"):
        f(hs, ws, ht, wt, labels=torch.zeros(N + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1271\)"):
        f(hs, ws, ht, wt, labels=torch.full((N,), V))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        f(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        f(hs, ws, ht, wt, chunk_size=2.5)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        f(hs, ws, ht, wt, softcap=-1.0)
    with pytest.raises(ValueError, match="grad_weight_dtype"):
        f(hs, ws, ht, wt, grad_weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(hs, ws, ht, wt, reduction="avg")
    with pytest.raises(ValueError, match="beta does not apply"):
        f(hs, ws, ht, wt, beta=0.3)
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        f(hs, ws, ht, wt, hard_weight=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        f(hs, ws, ht, wt, temperature=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        f(hs, ws, ht, wt, backend="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_oracle(dtype):
    x = [None if t is None else t.cuda() for t in make(dtype=dtype)]
    lab = labels_for((N,)).cuda()
    kw = dict(labels=lab, temperature=2.0, hard_weight=0.5)
    got = run(*x, chunk_size=16, softcap=20.0, **kw)
    cpu = [None if t is None else t.cpu() for t in x]
    exp = oracle_fused(*cpu, softcap=20.0, **oracle_kw("forward_kl", **{**kw, "labels": lab.cpu()}))
    plain = plain_fused(*x, "forward_kl", softcap=20.0, **kw)
    got = (got[0].cpu(), [g.cpu() for g in got[1]])
    plain = (plain[0].cpu(), [g.cpu() for g in plain[1]])
    check(got, exp, dtype, plain if dtype != torch.float32 else None, what=f"cuda {dtype}")


def test_bf16_logits_are_not_rounded_before_the_loss():
    """Issue 21 (Liger #1432): the chunk logits were computed in bf16 and then upcast. Now they come
    from the GEMM's fp32 accumulator. [256 x 256] @ [4096 x 256]ᵀ bf16, forward KL, T = 2, against
    float64 on the same bf16 values: loss 5.1e-5 -> 8.2e-8 relative, grad_h 9.5e-3 -> 3.4e-3,
    grad_w 1.0e-2 -> 4.5e-3 (the rest is the bf16 rounding of the returned gradients)."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 128, 128, 2048
    hs, ht = (torch.randn(n, d, generator=g).bfloat16() for _ in range(2))
    ws, wt = ((torch.randn(v, d, generator=g) * 0.2).bfloat16() for _ in range(2))
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = kd.fused_linear_kd_loss(h, w, ht, wt, divergence="forward_kl", temperature=2.0,
                                   backend="reference")
    loss.backward()
    h64, w64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = oracle.loss(h64 @ w64.t(), ht.double() @ wt.double().t(), divergence_name="forward_kl",
                      temperature=2.0)
    ref.backward()
    rel = lambda a, b: float((a.detach().double() - b).abs().max() / b.abs().max())
    assert rel(loss, ref.detach()) < 1e-6
    assert rel(h.grad, h64.grad) < 6e-3 and rel(w.grad, w64.grad) < 7e-3
