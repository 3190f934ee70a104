"""Extensions beyond one frozen teacher, against float64 oracles: per-token weights, teacher_stats,
teacher ensembles, teacher gradients (online/mutual distillation), logit_mse, feature losses,
bad inputs and backend capabilities."""
import itertools
import math

import pytest
import torch

import kdkernels as kd
from kdkernels import backends
from kdkernels.backends import reference
from kdkernels import divergences as D
from kdkernels.losses import teacher_stats as F
from conftest import assert_close
import oracle

NEG_INF = float("-inf")
ALL = D.names()
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.25}, "skew_reverse_kl": {"alpha": 0.25}}


def _okw(div):
    p = PARAMS.get(div, {})
    return dict(beta=p.get("beta", 0.5), alpha=p.get("alpha", 0.1))


# ---- float64 oracles for the extensions (dense, written from the definitions) -----------------

def ens_rows(s, ts, ws, div, temperature=1.0, labels=None, ignore_index=-100, soft_weight=1.0,
             hard_weight=0.0):
    """Per-row loss against the ensemble p = Σ_m w_m softmax(t_m / T) (logit_mse: the teacher
    logits Σ_m w_m t_m, the T → ∞ limit of the mixture), dense float64."""
    V, T = s.shape[-1], temperature
    s = s.double()
    ts = [t[..., :V].double() for t in ts]
    if div == "logit_mse":
        tmix = sum(w * t for w, t in zip(ws, ts) if w > 0)
        out = soft_weight * oracle.logit_mse(tmix, s)
    else:
        terms = [math.log(w) + oracle._logsm(t / T) for w, t in zip(ws, ts) if w > 0]
        logp = oracle._floor(torch.logsumexp(torch.stack(terms), 0))
        out = soft_weight * T * T * oracle.divergence(div, logp, oracle._logsm(s / T), **_okw(div))
    if labels is not None:
        keep = labels != ignore_index
        if hard_weight:
            lab = torch.where(keep, labels, 0).unsqueeze(-1)
            out = out - hard_weight * oracle._logsm(s).gather(-1, lab).squeeze(-1)
        out = torch.where(keep, out, torch.zeros_like(out))
    return out


def _leaf(x, grad=True):
    return x.detach().clone().requires_grad_(grad)


def _ugly_logits(*shape, scale=3.0, neg_inf_cols=(), gen=None):
    x = torch.randn(*shape, generator=gen) * scale
    if neg_inf_cols:
        x[..., list(neg_inf_cols)] = NEG_INF
    return x


# ---- registry ----------------------------------------------------------------------------------

def test_registry_logit_mse_and_kernel_names():
    assert D.get("logit_mse").id == 6 and "logit_mse" in ALL
    assert D.kernel_names() == ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
    assert D.get("logit_mse").feature == "logit_mse" in backends.FEATURES
    assert all(D.get(n).feature is None for n in D.kernel_names())
    assert len({d.id for d in D.DIVERGENCES.values()}) == len(ALL)


# ---- logit_mse ---------------------------------------------------------------------------------

def test_logit_mse_matches_its_definition():
    s = torch.randn(4, 6, 131) * 5
    t = torch.randn(4, 6, 140) * 5  # padded teacher vocabulary
    xs = _leaf(s)
    out = kd.kd_loss(xs, t, "logit_mse", temperature=3.0, soft_weight=0.7, reduction="none")
    out.sum().backward()
    # the definition, written out: (1/2V) Σ (t̃ − s̃)², no temperature, no T²
    s64, t64 = _leaf(s.double()), t[..., :131].double()
    tc, sc = t64 - t64.mean(-1, keepdim=True), s64 - s64.mean(-1, keepdim=True)
    exp = 0.7 * ((tc - sc) ** 2).sum(-1) / (2 * 131)
    exp.sum().backward()
    assert_close(out, exp.detach(), torch.float32, what="loss")
    assert_close(xs.grad, s64.grad, torch.float32, what="grad")
    # the gradient is (s̃ − t̃) / V per row, scaled by soft_weight
    assert_close(xs.grad, (0.7 * (sc - tc) / 131).detach(), torch.float32, what="closed form")
    # temperature does not apply
    other = kd.kd_loss(s, t, "logit_mse", temperature=0.25, soft_weight=0.7, reduction="none")
    assert torch.equal(out.detach(), other)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_logit_mse_against_oracle_with_labels_hard_term_and_shared_neg_inf(reduction):
    s = _ugly_logits(3, 5, 97, scale=1e4, neg_inf_cols=(0, 5, 96))
    t = _ugly_logits(3, 5, 97, scale=1e4, neg_inf_cols=(0, 5, 96))
    labels = torch.randint(1, 5, (3, 5))
    labels[0, :3] = -100
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.3, soft_weight=0.6)
    xs = _leaf(s)
    out = kd.kd_loss(xs, t, "logit_mse", reduction=reduction, **kw)
    out.sum().backward()
    exp, exp_grad = oracle.loss_and_grad(s, t, reduction=reduction, divergence_name="logit_mse", **kw)
    assert_close(out, exp.detach(), torch.float32, what="loss")
    assert_close(xs.grad, exp_grad, torch.float32, what="grad")
    assert (xs.grad[..., [0, 5, 96]] == 0).all()


def test_logit_mse_neg_inf_in_one_model_only_is_not_finite():
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    t[0, 3] = NEG_INF
    out = kd.kd_loss(s, t, "logit_mse", reduction="none")
    assert not torch.isfinite(out[0]) and torch.isfinite(out[1])


def test_logit_mse_is_the_large_temperature_limit_of_kl():
    """T²·KL(p‖q) → logit_mse as T → ∞ and the gap shrinks like 1/T: gap(T) / gap(2T) ≈ 2."""
    s = torch.randn(4, 50, dtype=torch.float64) * 2
    t = torch.randn(4, 50, dtype=torch.float64) * 2
    mse = kd.kd_loss(s, t, "logit_mse", reduction="none")
    assert_close(mse, oracle.rows(s, t, "logit_mse"), torch.float64)

    def gap(T):
        return (kd.kd_loss(s, t, "forward_kl", temperature=T, reduction="none") - mse).abs()

    g1, g2, g4 = gap(400.0), gap(800.0), gap(1600.0)
    assert (g1 < 0.01 * mse).all()
    ratio = g1 / g2
    assert ((ratio - 2).abs() < 0.15).all(), ratio
    assert ((g2 / g4 - 2).abs() < 0.1).all()


# ---- token weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("div", ALL)
def test_zero_token_weights_equal_masking(div):
    s = torch.randn(3, 7, 61) * 3
    t = torch.randn(3, 7, 61) * 3
    w = torch.ones(3, 7)
    w[0, :4] = 0
    w[2, 6] = 0
    s_garbage = s.clone()
    s_garbage[0, 1] = float("nan")  # a zero-weight row may hold garbage, like an ignored one
    labels = torch.where(w == 0, -100, torch.randint(0, 61, (3, 7)))
    for reduction in ["batchmean", "sum", "mean", "none"]:
        x1, x2 = _leaf(s_garbage), _leaf(s_garbage)
        kw = dict(temperature=2.0, reduction=reduction, hard_weight=0.4, **PARAMS.get(div, {}))
        a = kd.kd_loss(x1, t, div, token_weights=w, labels=torch.where(w == 0, 5, labels), **kw)
        b = kd.kd_loss(x2, t, div, labels=labels, **kw)
        a.sum().backward()
        b.sum().backward()
        assert torch.allclose(a, b, rtol=1e-6, atol=0) and not torch.isnan(a).any()
        assert torch.equal(x1.grad, x2.grad)
        assert (x1.grad[w == 0] == 0).all()


@pytest.mark.parametrize("div", ALL)
def test_token_weights_scale_loss_and_gradient(div):
    s, t = torch.randn(4, 5, 83) * 3, torch.randn(4, 5, 90) * 3
    w = torch.rand(4, 5) * 2
    w[1, 2] = 0.0
    labels = torch.randint(0, 83, (4, 5))
    labels[3, :2] = -100
    kw = dict(temperature=1.5, labels=labels, hard_weight=0.5)
    rows = oracle.rows(s, t, divergence_name=div, **kw, **_okw(div))  # float64, ignored rows 0
    counted = (labels != -100).double()
    for reduction in ["none", "sum", "batchmean", "mean"]:
        xs = _leaf(s)
        out = kd.kd_loss(xs, t, div, reduction=reduction, token_weights=w, **kw, **PARAMS.get(div, {}))
        out.sum().backward()
        s64 = _leaf(s.double())
        r = oracle.rows(s64, t, divergence_name=div, **kw, **_okw(div)) * w.double()
        denom = (w.double() * counted).sum()  # batchmean: sum of the counted rows' weights
        exp = {"none": r, "sum": r.sum(), "batchmean": r.sum() / denom,
               "mean": r.sum() / denom / 83}[reduction]
        exp.sum().backward()
        assert_close(out, exp.detach(), torch.float32, what=f"{reduction} loss")
        assert_close(xs.grad, s64.grad, torch.float32, what=f"{reduction} grad")
    # num_items_in_batch overrides the weight sum
    out = kd.kd_loss(s, t, div, token_weights=w, num_items_in_batch=7, **kw, **PARAMS.get(div, {}))
    assert_close(out, (rows * w.double()).sum() / 7, torch.float32)


def test_token_weights_gradient_and_module_and_all_zero():
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    w = _leaf(torch.rand(6) + 0.1)
    out = kd.kd_loss(s, t, "jsd", token_weights=w, reduction="sum")
    out.backward()  # d(Σ w_i l_i)/dw_i = l_i: the weights may be learned
    assert_close(w.grad, oracle.rows(s, t, "jsd"), torch.float32)
    crit = kd.KDLoss("tvd", temperature=2.0)
    assert torch.equal(crit(s, t, token_weights=w.detach()),
                       kd.kd_loss(s, t, "tvd", temperature=2.0, token_weights=w.detach()))
    x = _leaf(s)
    zero = kd.kd_loss(x, t, token_weights=torch.zeros(6))
    zero.backward()
    assert float(zero.detach()) == 0.0 and (x.grad == 0).all()


# ---- teacher_stats -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_teacher_stats_against_dense_float64(dtype, monkeypatch):
    monkeypatch.setattr(F, "STATS_BLOCK", 16)  # several V-blocks, V not a multiple of the block
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 16 * 3)  # several row chunks
    full = torch.randn(3, 8, 110) * 4
    full[..., [2, 50, 99]] = NEG_INF
    full[1, 2] *= 2500  # |logits| ≈ 1e4
    t = full[:, :-1].to(dtype)  # strided view; columns >= 100 are vocabulary padding
    st = kd.teacher_stats(t, temperature=1.7, vocab_size=100)
    assert st.lse.shape == st.entropy.shape == st.max_prob.shape == (3, 7)
    assert st.lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    a = t[..., :100].double() / 1.7
    logp = torch.log_softmax(a, -1)
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    tol = torch.float32 if dtype == torch.bfloat16 else dtype  # the input is exact; fp32 math
    assert_close(st.lse, torch.logsumexp(a, -1), tol, what="lse")
    assert_close(st.entropy, ent, tol, what="entropy")
    assert_close(st.max_prob, p.amax(-1), tol, what="max_prob")
    assert (st.entropy >= -1e-6).all() and (st.max_prob <= 1 + 1e-6).all()


def test_teacher_stats_edge_rows():
    t = torch.zeros(3, 10)
    t[1] = NEG_INF
    t[2, 4] = 1e4
    st = kd.teacher_stats(t)
    assert torch.allclose(st.entropy[0], torch.tensor(math.log(10)))
    assert torch.allclose(st.max_prob[0], torch.tensor(0.1))
    assert st.lse[1] == NEG_INF and torch.isnan(st.entropy[1])
    assert st.entropy[2].abs() < 1e-6 and st.max_prob[2] == 1.0
    assert torch.isfinite(kd.teacher_stats(torch.randn(5)).lse)  # a single row, shape ()


# ---- ensembles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("div", ALL)
def test_ensemble_of_one_equals_single_teacher(div):
    s, t = torch.randn(3, 4, 57) * 3, torch.randn(3, 4, 60) * 3
    kw = dict(temperature=2.0, reduction="none", **PARAMS.get(div, {}))
    single = kd.kd_loss(s, t, div, **kw)
    assert torch.equal(kd.kd_loss(s, [t], div, **kw), single)
    assert torch.equal(kd.kd_loss(s, t.unsqueeze(0), div, teacher_weights=[1.0], **kw), single)


@pytest.mark.parametrize("div,stacked", list(itertools.product(ALL, [False, True])))
def test_ensemble_of_three_against_oracle(div, stacked, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 64 * 4)  # several row chunks
    cols = (0, 9, 63)  # masked vocabulary shared by every model
    s = _ugly_logits(2, 5, 64, neg_inf_cols=cols)
    full = _ugly_logits(3, 2, 6, 70, neg_inf_cols=cols)
    full[1, 0, 1] *= 3000  # one teacher with |logits| ≈ 1e4 on one row
    ts = full[:, :, 1:]  # sequence-shifted teachers, padded vocabulary (70 > 64)
    ws = [0.5, 0.3, 0.2]
    labels = torch.randint(10, 60, (2, 5))
    labels[1, 1:4] = -100
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.3, soft_weight=0.8)
    teacher = ts if stacked else list(ts.unbind(0))
    xs = _leaf(s)
    out = kd.kd_loss(xs, teacher, div, teacher_weights=ws, reduction="none", **kw,
                     **PARAMS.get(div, {}))
    out.sum().backward()
    s64 = _leaf(s.double())
    exp = ens_rows(s64, list(ts), ws, div, **kw)
    exp.sum().backward()
    assert_close(out, exp.detach(), torch.float32, what="loss")
    assert_close(xs.grad, s64.grad, torch.float32, what="grad")
    assert (xs.grad[..., list(cols)] == 0).all()


def test_ensemble_default_uniform_weights_and_zero_weight_teacher():
    s, t1, t2, t3 = (torch.randn(5, 33) for _ in range(4))
    uni = kd.kd_loss(s, [t1, t2, t3], "jsd", beta=0.3, temperature=2.0, reduction="none")
    assert_close(uni, ens_rows(s, [t1, t2, t3], [1 / 3] * 3, "jsd", temperature=2.0), torch.float32)
    # a teacher of weight 0 changes nothing
    two = kd.kd_loss(s, [t1, t2], "reverse_kl", teacher_weights=[0.25, 0.75], reduction="none")
    three = kd.kd_loss(s, [t1, t3, t2], "reverse_kl", teacher_weights=[0.25, 0.0, 0.75],
                       reduction="none")
    assert torch.allclose(two, three, rtol=1e-6, atol=1e-7)


# ---- teacher gradients (online / mutual distillation) -----------------------------------------

@pytest.mark.parametrize("div", ALL)
def test_teacher_gradient_against_float64_autograd(div, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 64 * 4)  # several row chunks
    cols = (3, 40) if div != "logit_mse" else ()
    s = _ugly_logits(3, 5, 64, neg_inf_cols=cols)
    t = _ugly_logits(3, 5, 72, neg_inf_cols=cols)  # padded vocabulary: zero gradient there
    labels = torch.randint(41, 64, (3, 5))
    labels[2, :3] = -100
    t_garbage = t.clone()
    t_garbage[2, 1] = float("nan")  # ignored rows may hold garbage in the teacher too
    kw = dict(temperature=1.5, labels=labels, hard_weight=0.2, soft_weight=0.9)
    xs, xt = _leaf(s), _leaf(t_garbage)
    out = kd.kd_loss(xs, xt, div, **kw, **PARAMS.get(div, {}))
    out.backward()
    s64, t64 = _leaf(s.double()), _leaf(t.double())
    exp = oracle.loss(s64, t64, divergence_name=div, **kw, **_okw(div))
    exp.backward()
    assert_close(out, exp.detach(), torch.float32, what="loss")
    assert_close(xs.grad, s64.grad, torch.float32, what="student grad")
    assert_close(xt.grad, t64.grad, torch.float32, what="teacher grad")
    assert (xt.grad[..., 64:] == 0).all() and (xt.grad[2, :3] == 0).all()
    assert torch.isfinite(xt.grad).all()
    # teacher_requires_grad=False: a teacher that requires grad is still a constant
    xt2 = _leaf(t)
    kd.kd_loss(_leaf(s), xt2, div, teacher_requires_grad=False, **kw, **PARAMS.get(div, {})).backward()
    assert xt2.grad is None


def test_teacher_gradient_closed_forms_of_design_notes():
    """DESIGN.md §3: ∂KL(p‖q)/∂a = p (log p − log q − KL), ∂KL(q‖p)/∂a = p − q; ∂/∂t = (1/T)∂/∂a,
    times T² for the soft term."""
    T = 2.0
    s, t = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
    logp, logq = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
    p, q = logp.exp(), logq.exp()
    kl = (p * (logp - logq)).sum(-1, keepdim=True)
    for div, g_a in [("forward_kl", p * (logp - logq - kl)), ("reverse_kl", p - q)]:
        xt = _leaf(t)
        kd.kd_loss(s, xt, div, temperature=T, reduction="sum").backward()
        assert_close(xt.grad, T * g_a, torch.float64, what=div)


@pytest.mark.parametrize("div", ALL)
def test_ensemble_teacher_gradients(div):
    s = torch.randn(2, 3, 29) * 2
    ts = [torch.randn(2, 3, 31) * 2 for _ in range(3)]
    ws = [0.2, 0.5, 0.3]
    labels = torch.tensor([[1, -100, 5], [0, 7, 28]])
    kw = dict(temperature=1.7, labels=labels)
    xs = _leaf(s)
    xts = [_leaf(ts[0]), ts[1], _leaf(ts[2])]  # the middle teacher is frozen
    out = kd.kd_loss(xs, xts, div, teacher_weights=ws, **kw, **PARAMS.get(div, {}))
    out.backward()
    s64, t64 = _leaf(s.double()), [_leaf(t.double()) for t in ts]
    rows = ens_rows(s64, t64, ws, div, **kw)
    (rows.sum() / 5).backward()
    assert_close(xs.grad, s64.grad, torch.float32, what="student grad")
    for m in (0, 2):
        assert_close(xts[m].grad, t64[m].grad, torch.float32, what=f"teacher {m} grad")
    assert ts[1].grad is None


@pytest.mark.parametrize("div", ALL)
def test_gradcheck_float64_with_teacher_gradients(div):
    s = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 10], [0, 5, -100]])
    w = torch.rand(2, 3, dtype=torch.float64) + 0.5

    def single(x, y):
        return kd.kd_loss(x, y, div, temperature=1.3, labels=labels, hard_weight=0.4,
                          token_weights=w, **PARAMS.get(div, {}))

    def ensemble(x, y, z):
        return kd.kd_loss(x, [y, z], div, temperature=1.3, teacher_weights=[0.4, 0.6],
                          **PARAMS.get(div, {}))

    assert torch.autograd.gradcheck(single, (s, t))
    assert torch.autograd.gradcheck(ensemble, (s, t, t2))


def test_mutual_distillation_step_and_torch_compile():
    """Two models teach each other: one loss, gradients to both logits; same under compile."""
    a, b = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    ensemble = torch.randn(2, 2, 5, 40)
    w = torch.rand(2, 5)

    def step(x, y):
        return (kd.kd_loss(x, y, "jsd", temperature=2.0, token_weights=w)
                + kd.kd_loss(x, ensemble, "forward_kl", teacher_weights=[0.3, 0.7]))

    x1, y1, x2, y2 = _leaf(a), _leaf(b), _leaf(a), _leaf(b)
    eager = step(x1, y1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x2, y2)
    compiled.backward()
    assert y1.grad is not None and y1.grad.abs().sum() > 0
    assert torch.allclose(eager, compiled, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6) and torch.allclose(y1.grad, y2.grad, atol=1e-6)


# ---- feature losses ----------------------------------------------------------------------------

def _feature_oracle(sh, th, kind, weight=None, bias=None):
    x = sh.double() if weight is None else sh.double() @ weight.double().T + bias.double()
    t = th.double()
    if kind == "mse":
        return ((x - t) ** 2).mean(-1)
    return 1 - (x * t).sum(-1) / (x.norm(dim=-1) * t.norm(dim=-1))


@pytest.mark.parametrize("kind,reduction", list(itertools.product(
    ["mse", "cosine"], ["batchmean", "sum", "mean", "none"])))
def test_feature_loss_with_mask_and_projection(kind, reduction):
    Ds, Dt = 12, 20
    sh = torch.randn(3, 5, Ds) * 2
    th = torch.randn(3, 5, Dt) * 2
    labels = torch.randint(0, 100, (3, 5))
    labels[1, 2:] = -100
    sh_garbage = sh.clone()
    sh_garbage[1, 3] = float("nan")  # padding rows may hold garbage
    th_garbage = th.clone()
    th_garbage[1, 4] = float("inf")
    crit = kd.FeatureLoss(kind, student_dim=Ds, teacher_dim=Dt, reduction=reduction)
    assert isinstance(crit.projection, torch.nn.Linear)
    xs = _leaf(sh_garbage)
    out = crit(xs, th_garbage, labels)
    out.sum().backward()
    # float64 oracle on the counted rows only
    s64, W, bias = _leaf(sh.double()), _leaf(crit.projection.weight), _leaf(crit.projection.bias)
    keep = labels != -100
    rows = torch.where(keep, _feature_oracle(s64, th, kind, W, bias), 0.0)
    n = keep.sum()
    exp = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / n, "mean": rows.sum() / n}[reduction]
    exp.sum().backward()
    assert_close(out, exp.detach(), torch.float32, what="loss")
    assert_close(xs.grad, s64.grad, torch.float32, what="student grad")
    assert_close(crit.projection.weight.grad, W.grad, torch.float32, what="projection weight grad")
    assert_close(crit.projection.bias.grad, bias.grad, torch.float32, what="projection bias grad")
    assert (xs.grad[~keep] == 0).all()


def test_feature_loss_plain_weights_teacher_grad_and_mean_is_mse_loss():
    sh, th = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    out = kd.feature_loss(sh, th, "mse", reduction="mean")
    assert torch.allclose(out, torch.nn.functional.mse_loss(sh, th), rtol=1e-6)
    w = torch.rand(4, 6)
    w[0] = 0
    xt = _leaf(th)
    got = kd.feature_loss(sh, xt, "cosine", token_weights=w)
    got.backward()
    t64 = _leaf(th.double())
    exp = (_feature_oracle(sh, t64, "cosine") * w.double()).sum() / w.double().sum()
    exp.backward()
    assert_close(got, exp.detach(), torch.float32)
    assert_close(xt.grad, t64.grad, torch.float32, what="teacher grad")
    assert torch.equal(kd.feature_loss(sh, th, num_items_in_batch=100, reduction="batchmean"),
                       kd.feature_loss(sh, th, reduction="sum") / 100)
    none = kd.feature_loss(sh, th, labels=torch.full((4, 6), -100), reduction="batchmean")
    assert float(none) == 0.0
    assert kd.FeatureLoss("mse", student_dim=16, teacher_dim=16).projection is None


# ---- bad inputs --------------------------------------------------------------------------------

S, T1, T2 = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(token_weights=torch.tensor([1.0, -0.5, 1.0, 1.0])), ValueError, "token_weights must be finite and >= 0"),
    (dict(token_weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "token_weights"),
    (dict(token_weights=torch.ones(4, 1)), ValueError, "token_weights must have the leading shape"),
    (dict(token_weights=torch.ones(4, dtype=torch.long)), TypeError, "token_weights"),
    (dict(token_weights=[1.0] * 4), TypeError, "token_weights"),
    (dict(teacher_logits=[T1, T2], teacher_weights=[0.5, 0.6]), ValueError, "sum to 1"),
    (dict(teacher_logits=[T1, T2], teacher_weights=[1.5, -0.5]), ValueError, "teacher_weights[1]"),
    (dict(teacher_logits=[T1, T2], teacher_weights=[1.0]), ValueError, "teacher_weights has 1"),
    (dict(teacher_logits=[T1, T2], teacher_weights=0.5), TypeError, "teacher_weights"),
    (dict(teacher_logits=[T1, torch.randn(4, 12)]), ValueError, "same vocabulary width"),
    (dict(teacher_logits=[T1, torch.randn(3, 10)]), ValueError, "teacher_logits[1] leading shape"),
    (dict(teacher_logits=[T1, T2.double()]), TypeError, "teacher_logits[1] dtype"),
    (dict(teacher_logits=[]), ValueError, "empty"),
    (dict(teacher_logits=torch.randn(2, 4, 9)), ValueError, "vocabulary"),
    (dict(teacher_requires_grad=True), ValueError, "teacher_requires_grad"),
    (dict(teacher_requires_grad=1), TypeError, "teacher_requires_grad"),
    (dict(teacher_logits=[T1.clone().requires_grad_(True), T2], backend="cpu"), ValueError,
     "backend='cpu' does not support teacher gradients of an ensemble"),
    (dict(teacher_logits=[T1, T2], divergence="logit_mse", backend="cpu"), ValueError,
     "backend='cpu' does not support logit_mse with an ensemble"),
    (dict(divergence="jsd", beta=1e-9, teacher_logits=T1.clone().requires_grad_(True),
          backend="cpu"), ValueError, "1 - beta rounds to 1"),
])
def test_bad_inputs(kwargs, exc, needle):
    args = dict(student_logits=S, teacher_logits=T1)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        kd.kd_loss(**args)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda: kd.feature_loss(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "projection"),
    (lambda: kd.feature_loss(torch.randn(3, 4), torch.randn(3, 4), kind="l1"), ValueError, "kind"),
    (lambda: kd.feature_loss(torch.randn(3, 4), torch.randn(2, 4)), ValueError, "leading shape"),
    (lambda: kd.feature_loss(torch.randn(3, 4), torch.randn(3, 4), labels=torch.zeros(3)),
     TypeError, "labels"),
    (lambda: kd.feature_loss(torch.randn(3, 4), torch.randn(3, 4), token_weights=-torch.ones(3)),
     ValueError, "token_weights"),
    (lambda: kd.feature_loss(torch.randn(3, 4), torch.randn(3, 6),
                             projection=torch.nn.Linear(4, 5)), ValueError, "projection maps"),
    (lambda: kd.FeatureLoss("mse", student_dim=4, projection=True), ValueError, "teacher_dim"),
    (lambda: kd.teacher_stats(torch.randn(3, 4), vocab_size=5), ValueError, "vocab_size"),
    (lambda: kd.teacher_stats(torch.randn(3, 4), temperature=0), ValueError, "temperature"),
])
def test_bad_inputs_features_and_stats(call, exc, needle):
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value), str(info.value)


# ---- backend capabilities ----------------------------------------------------------------------

def test_auto_skips_kernel_backends_lacking_a_feature(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setitem(backends._AVAILABILITY, "cpu", None)  # pretend the C++ backend is built
    assert backends.choose("auto", cpu, torch.float32) == "cpu"
    for need in backends.FEATURES - backends.BACKENDS["cpu"].features:
        assert backends.choose("auto", cpu, torch.float32, frozenset({need})) == "reference"
        assert need in backends.BACKENDS["reference"].features
    for name in ("triton", "cuda", "cpu"):
        assert {"teacher_grad", "logit_mse", "ensemble"} <= backends.BACKENDS[name].features
    assert backends.choose("auto", cpu, torch.float32, frozenset({"logit_mse"})) == "cpu"
    assert backends.choose("auto", cpu, torch.float32, frozenset({"ensemble"})) == "cpu"
    # a combination no kernel computes (logit_mse with an ensemble) runs on the reference
    s, t1, t2 = torch.randn(3, 20), torch.randn(3, 20), torch.randn(3, 20)
    got = kd.kd_loss(s, [t1, t2], "logit_mse", reduction="none")
    assert_close(got, ens_rows(s, [t1, t2], [0.5, 0.5], "logit_mse"), torch.float32)
