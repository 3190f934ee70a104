"""The C++ CPU backend (kdkernels._C, backend="cpu") against the float64 oracle. The edge cases
every backend shares (−inf columns, huge logits, underflow, strided views, ignored rows, NaN,
out-of-range labels) are in test_contract.py.

Values and gradients go through the public kd_loss(..., backend="cpu"); the error bound is
conftest.assert_close with the reference backend in the same dtype as the "plain PyTorch" term.
"""
import math

import pytest
import torch

import kdkernels as kd
from kdkernels import divergences
from kdkernels.backends import compiled as cpp
from kdkernels.ops.dense import kd_rows, kd_rows_backward, kd_rows_given_stats

import oracle
from conftest import TOL, assert_close

REASON = cpp.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"C++ CPU backend unavailable: {REASON}")

DIVS = divergences.kernel_names()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARAM = {"jsd": ("beta", 0.3), "skew_kl": ("alpha", 0.2), "skew_reverse_kl": ("alpha", 0.2)}


def _kw(div, **extra):
    kw = dict(divergence=div, **extra)
    if div in PARAM:
        kw[PARAM[div][0]] = PARAM[div][1]
    return kw


def _oracle_kw(kw):
    out = {k: v for k, v in kw.items() if k not in ("divergence",)}
    out["divergence_name"] = kw["divergence"]
    return out


def _run(backend, s, t, weights, kw):
    x = s.detach().requires_grad_(True)  # keeps the strides of a view (clone would not)
    rows = kd.kd_loss(x, t, reduction="none", backend=backend, **kw)
    (g,) = torch.autograd.grad((rows * weights).sum(), x)
    return rows.detach(), g


def check(s, t, keep=None, **kw):
    """Per-row values and the gradient of a randomly weighted sum: cpu vs oracle (and reference).

    ``keep``: columns the oracle sees (the others are -inf in both teacher and student, carry no
    probability, and must get an exactly zero gradient); labels index the full vocabulary.
    """
    weights = torch.rand(s.shape[:-1], dtype=torch.float32) + 0.5
    rows, g = _run("cpu", s, t, weights, kw)
    ref_rows, ref_g = _run("reference", s, t, weights, kw)
    okw = _oracle_kw(kw)
    if keep is not None:
        assert (g[..., ~keep] == 0).all()
        s, t, g, ref_g = s[..., keep], t[..., keep], g[..., keep], ref_g[..., keep]
        if okw.get("labels") is not None:
            new_index = torch.cumsum(keep.long(), 0) - 1
            okw["labels"] = torch.where(okw["labels"] >= 0, new_index[okw["labels"].clamp_min(0)],
                                        okw["labels"])
    s64 = s.detach().double().requires_grad_(True)
    o_rows = oracle.rows(s64, t.detach(), **okw)
    (o_g,) = torch.autograd.grad((o_rows * weights.double()).sum(), s64)
    if torch.isnan(o_g).any() and not torch.isnan(o_rows).any():
        # The oracle's autograd turns NaN when a mixture probability underflows to 0 in float64
        # (huge logits, mixture divergences); the masked float64 reference backend is the
        # expected gradient there.
        assert torch.isfinite(g).all()
        x64 = s.detach().double().requires_grad_(True)
        r64 = kd.kd_loss(x64, t.detach().double(), reduction="none", backend="reference", **kw)
        (o_g,) = torch.autograd.grad((r64 * weights.double()).sum(), x64)
        assert torch.isfinite(o_g).all()
    assert g.dtype == s.dtype and g.shape == s.shape and g.is_contiguous()
    assert_close(rows, o_rows.detach(), s.dtype, plain=ref_rows, what="values")
    natural = kw.get("soft_weight", 1.0) * kw.get("temperature", 1.0) + kw.get("hard_weight", 0.0)
    if float(o_g.abs().max()) < 1e-6 * natural:
        # Saturated case (e.g. jsd of two near one-hot rows at |logits| = 1e4): the true gradient
        # is ~0 and fp32 cancellation leaves residues relative to the O(T) terms it cancels.
        assert float((g.double() - o_g).abs().max()) <= TOL[s.dtype] * natural * float(weights.max())
    else:
        assert_close(g, o_g, s.dtype, plain=ref_g, what="gradient")
    return rows, g


def logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def test_ids_match_python_registry():
    by_id = sorted(divergences.DIVERGENCES.values(), key=lambda d: d.id)  # logit_mse included
    assert [d.id for d in by_id] == list(range(len(by_id)))
    assert cpp.divergence_names() == [d.name for d in by_id]
    assert int(torch.ops.kdkernels_C.stats_width()) == cpp.STATS_WIDTH == 7


@pytest.mark.parametrize("V", [1, 7, 1271])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_matrix_labels_hard_term(div, dtype, V):
    B, L = 2, 3
    s, t = logits((B, L, V), dtype), logits((B, L, V), dtype)
    labels = torch.randint(0, V, (B, L))
    labels[0, 1] = -100
    labels[1, 2] = -100
    rows, g = check(s, t, **_kw(div, temperature=2.0, labels=labels, hard_weight=0.4, soft_weight=0.8))
    assert rows[0, 1] == 0 and rows[1, 2] == 0
    assert (g[0, 1] == 0).all() and (g[1, 2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_large_vocab(div, dtype):
    s, t = logits((1, 2, 32000), dtype), logits((1, 2, 32000), dtype)
    labels = torch.tensor([[5, 31999]])
    check(s, t, **_kw(div, temperature=1.5, labels=labels, hard_weight=0.2))


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_hard_only_and_soft_only(T):
    s, t = logits((2, 4, 333), torch.float32), logits((2, 4, 333), torch.float32)
    labels = torch.randint(0, 333, (2, 4))
    check(s, t, divergence="reverse_kl", temperature=T, labels=labels, soft_weight=0.0, hard_weight=1.0)
    check(s, t, divergence="reverse_kl", temperature=T, labels=labels, soft_weight=1.0, hard_weight=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_independence_bitwise(dtype):
    """Each row is computed by one thread in a fixed order: 1 and 2 threads agree bitwise."""
    s, t = logits((4, 16, 3001), dtype), logits((4, 16, 3001), dtype)
    labels = torch.randint(0, 3001, (4, 16))
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for div in ("forward_kl", "jsd"):
                x = s.clone().requires_grad_(True)
                rows = kd.kd_loss(x, t, labels=labels, hard_weight=0.5, temperature=2.0,
                                  reduction="none", backend="cpu", **_kw(div))
                (g,) = torch.autograd.grad(rows.sum(), x)
                results.append((n, div, rows, g))
    finally:
        torch.set_num_threads(old)
    one, two = results[:2], results[2:]
    for (_, d1, r1, g1), (_, d2, r2, g2) in zip(one, two):
        assert d1 == d2
        assert torch.equal(r1, r2) and torch.equal(g1, g2)


def _op_args(dtype=torch.float32, labels=True):
    s = logits((2, 3, 129), dtype)
    t = logits((2, 3, 140), dtype)[..., :129]
    lab = torch.randint(0, 129, (6,)) if labels else None
    if lab is not None:
        lab[1] = -100
    return s, t, lab


@pytest.mark.parametrize("div", DIVS)
def test_opcheck_kd_rows_cpu(div):
    d = divergences.get(div)
    s, t, lab = _op_args()
    s.requires_grad_(True)
    args = (s, t, lab, "cpu", d.id, d.check_param(None), 2.0, 1.0, 0.5, -100)
    torch.library.opcheck(kd_rows, args)
    # and with the teacher requiring grad (its backward: ops.dense.teacher_grad)
    torch.library.opcheck(kd_rows, (s, t.detach().clone().requires_grad_(True)) + args[2:])
    loss, stats = kd_rows(*args)
    # kd_rows_backward has no autograd formula of its own (no double backward): skip the
    # aot_dispatch test, which differentiates through it.
    torch.library.opcheck(kd_rows_backward,
                          (torch.rand(6), s.detach(), t, lab, stats, "cpu", *args[4:]),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_kdkernels_C_ops(dtype):
    s, t, lab = _op_args(dtype)
    scal = (2, 0.5, 2.0, 1.0, 0.5, -100)
    torch.library.opcheck(torch.ops.kdkernels_C.kd_rows_fwd.default, (s, t, lab, *scal))
    loss, stats = torch.ops.kdkernels_C.kd_rows_fwd(s, t, None, *scal)
    torch.library.opcheck(torch.ops.kdkernels_C.kd_rows_bwd.default,
                          (torch.rand(6), s, t, None, stats, *scal))


@pytest.mark.parametrize("div", ["jsd", "tvd"])
def test_opcheck_kd_rows_given_stats(div):
    """The vocab-parallel pass with given statistics: schema and fake kernel of the kdkernels::
    op and of the kdkernels_C op (no autograd: its caller differentiates through backward)."""
    d = divergences.get(div)
    s, t, lab = _op_args()
    _, stats = kd_rows(s, t, lab, "cpu", d.id, d.check_param(None), 2.0, 1.0, 0.0, -100)
    args = (s, t, lab, stats, "cpu", d.id, d.check_param(None), 2.0, -100)
    torch.library.opcheck(kd_rows_given_stats, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.kdkernels_C.kd_rows_given_stats.default,
                          (s, t, lab, stats, d.id, d.check_param(None), 2.0, -100),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_op():
    s, t, lab = _op_args()
    f = torch.compile(lambda a, b: kd_rows(a, b, lab, "cpu", 0, 0.0, 2.0, 1.0, 0.5, -100)[0].sum(),
                      fullgraph=True, backend="aot_eager")
    x = s.clone().requires_grad_(True)
    out = f(x, t)
    (g,) = torch.autograd.grad(out, x)
    y = s.clone().requires_grad_(True)
    exp = kd_rows(y, t, lab, "cpu", 0, 0.0, 2.0, 1.0, 0.5, -100)[0].sum()
    (g_exp,) = torch.autograd.grad(exp, y)
    assert torch.equal(out, exp) and torch.equal(g, g_exp)


def test_bad_arguments():
    s, t, lab = _op_args()
    op = torch.ops.kdkernels_C.kd_rows_fwd
    with pytest.raises(TypeError, match="dtype"):
        op(s.double(), t.double(), lab, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(TypeError, match="teacher dtype"):
        op(s, t.half(), lab, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="div_id"):
        op(s, t, lab, 9, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="teacher shape"):
        op(s, t[..., :100], lab, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="labels"):
        op(s, t, lab[:3], 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(TypeError, match="labels must be int64"):
        op(s, t, lab.int(), 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="student must be a"):
        op(s[0], t[0], lab, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="temperature"):
        op(s, t, lab, 0, 0.0, 0.0, 1.0, 0.0, -100)


def test_auto_picks_cpu_backend():
    from kdkernels import backends
    assert backends.choose("auto", torch.device("cpu"), torch.float32) == "cpu"


def test_cuda_reason_is_a_string_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert isinstance(cpp.unavailable_reason("cuda"), str)
