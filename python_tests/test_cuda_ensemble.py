"""Teacher ensembles on the CUDA backend: ``backends.load("cuda").forward_rows_ensemble`` /
``backward_rows_ensemble`` (csrc/cuda/ensemble_cuda.cuh) against the float64 reference
``reference.loss_rows(..., teacher_weights=ws)`` and its autograd gradient. On a GPU the real
kernels (CUDA tensors); without one, under the host emulation (KDKERNELS_CUDA_EMULATE=1, set by
conftest), on CPU tensors."""
import pytest
import torch

from kdkernels import backends, divergences
from kdkernels.backends import compiled as cpp
from kdkernels.backends import reference

from conftest import assert_close, cuda_emulated

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    if not cuda_emulated():
        pytestmark.append(pytest.mark.skip(
            reason="no CUDA GPU on this machine (and no CUDA emulation: KDKERNELS_CUDA_EMULATE=1)"))
elif cpp.unavailable_reason("cuda"):
    pytestmark.append(pytest.mark.skip(
        reason=f"CUDA backend unavailable: {cpp.unavailable_reason('cuda')}"))

DIVS = divergences.kernel_names()
DIV_ID = {n: i for i, n in enumerate(DIVS)}
PARAM = {"jsd": 0.3, "skew_kl": 0.2, "skew_reverse_kl": 0.2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = {1: [1.0], 2: [0.625, 0.375], 3: [0.5, 0.3, 0.2],
           8: [0.25, 0.05, 0.1, 0.15, 0.05, 0.2, 0.125, 0.075]}
II = -100


def logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEV)


def cuda():
    return backends.load("cuda")


def _ref(s, ts, ws, labels, div, T, sw, hw, dtype64=True):
    """Per-row losses and the gradient of sum(g_loss * rows) w.r.t. the student (reference)."""
    cast = (lambda x: x.detach().double().cpu()) if dtype64 else (lambda x: x.detach().cpu())
    x = cast(s).requires_grad_(True)
    lab = None if labels is None else labels.cpu()
    # the reference takes teachers in the student's [B, L] split (the kernels take any B' L' = N)
    tr = [cast(t).reshape(s.shape[0], s.shape[1], t.shape[-1]) for t in ts]
    rows = reference.loss_rows(x, tr, lab, DIV_ID[div], PARAM.get(div, 0.0),
                               T, sw, hw, II, teacher_weights=ws)
    return rows, x


def check(s, ts, ws, labels=None, div="forward_kl", T=2.0, sw=1.0, hw=0.0):
    """Run forward + backward on the cuda backend and compare with the float64 reference (the
    reference in the input dtype as the 'plain' baseline). Returns (loss, stats, grad)."""
    be = cuda()
    N = s.shape[0] * s.shape[1]
    lab = None if labels is None else labels.reshape(-1)
    loss, stats = be.forward_rows_ensemble(s, ts, ws, lab, DIV_ID[div], PARAM.get(div, 0.0), T,
                                           sw, hw, II)
    assert loss.shape == (N,) and loss.dtype == torch.float32
    assert stats.shape == (N, 7 + 2 * (len(ts) - 1)) and stats.dtype == torch.float32
    gl = (torch.rand(N, dtype=torch.float32) + 0.5).to(DEV)
    grad = be.backward_rows_ensemble(gl, s, ts, ws, lab, stats, DIV_ID[div], PARAM.get(div, 0.0),
                                     T, sw, hw, II)
    assert grad.shape == s.shape and grad.dtype == s.dtype and grad.is_contiguous()
    rows64, x64 = _ref(s, ts, ws, lab, div, T, sw, hw)
    (g64,) = torch.autograd.grad((rows64 * gl.cpu().double()).sum(), x64)
    rows_p, xp = _ref(s, ts, ws, lab, div, T, sw, hw, dtype64=False)
    (gp,) = torch.autograd.grad((rows_p * gl.cpu().to(rows_p.dtype)).sum(), xp)
    assert_close(loss.cpu(), rows64.detach().float(), s.dtype, plain=rows_p.detach(), what="loss")
    assert_close(grad.cpu(), g64.reshape(s.shape), s.dtype, plain=gp.reshape(s.shape),
                 what="gradient")
    return loss.cpu(), stats.cpu(), grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 3, 8])
@pytest.mark.parametrize("div", DIVS)
def test_matrix(div, M, dtype):
    B, L, V = 2, 3, 1271  # V not a multiple of the block
    s = logits((B, L, V), dtype)
    ts = [logits((B, L, V), dtype) for _ in range(M)]
    labels = torch.randint(0, V, (B, L), device=DEV)
    labels[0, 1] = II
    loss, stats, grad = check(s, ts, WEIGHTS[M], labels, div, T=2.0, sw=0.7, hw=0.4)
    assert loss[1] == 0 and (grad[0, 1] == 0).all() and (stats[1] == 0).all()


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("hw", [0.0, 0.5])
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_hard_term_and_temperature(div, hw, T):
    s = logits((2, 2, 300), torch.float32)
    ts = [logits((2, 2, 300), torch.float32) for _ in range(2)]
    labels = torch.randint(0, 300, (2, 2), device=DEV)
    check(s, ts, WEIGHTS[2], labels, div, T=T, sw=1.0, hw=hw)


@pytest.mark.parametrize("div", DIVS)
def test_hard_term_only(div):
    s = logits((1, 3, 513), torch.float32)
    ts = [logits((1, 3, 513), torch.float32) for _ in range(3)]
    labels = torch.randint(0, 513, (1, 3), device=DEV)
    check(s, ts, WEIGHTS[3], labels, div, T=2.0, sw=0.0, hw=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_huge_logits(div, dtype):
    s = logits((2, 2, 1000), dtype, 1e4)
    ts = [logits((2, 2, 1000), dtype, 1e4) for _ in range(3)]
    check(s, ts, WEIGHTS[3], None, div, T=1.0)
    check(s, ts, WEIGHTS[3], None, div, T=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_columns(div, dtype):
    B, L, V = 2, 2, 700
    s = logits((B, L, V), dtype)
    ts = [logits((B, L, V), dtype) for _ in range(3)]
    ts[1][..., 5] = float("-inf")          # one teacher
    for t in ts:
        t[..., 11] = float("-inf")         # every teacher
    s[..., 11] = float("-inf")             # and the student: p = q = 0 there
    s[..., 600:] = float("-inf")
    for t in ts:
        t[..., 600:] = float("-inf")
    loss, _, grad = check(s, ts, WEIGHTS[3], None, div)
    assert torch.isfinite(loss).all() and (grad[..., 11] == 0).all()


@pytest.mark.parametrize("div", DIVS)
def test_student_neg_inf_only(div):
    """q = 0 < p in a column: the loss may be +inf (forward KL, skew...), the gradient then follows
    the +inf-loss rule: each row finite everywhere or NaN everywhere."""
    s = logits((1, 2, 300), torch.float32)
    ts = [logits((1, 2, 300), torch.float32) for _ in range(2)]
    s[0, 0, 7] = float("-inf")
    be = cuda()
    loss, stats = be.forward_rows_ensemble(s, ts, WEIGHTS[2], None, DIV_ID[div],
                                           PARAM.get(div, 0.0), 2.0, 1.0, 0.0, II)
    rows64, x64 = _ref(s, ts, WEIGHTS[2], None, div, 2.0, 1.0, 0.0)
    assert_close(loss.cpu(), rows64.detach().float(), torch.float32, what="loss")
    grad = be.backward_rows_ensemble(torch.ones(2, device=DEV), s, ts, WEIGHTS[2], None, stats,
                                     DIV_ID[div], PARAM.get(div, 0.0), 2.0, 1.0, 0.0, II).cpu()
    for r in range(2):
        row = grad[0, r]
        assert torch.isfinite(row).all() or torch.isnan(row).all(), (div, r)
    assert torch.isfinite(grad[0, 1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_strided_views(div, dtype):
    B, L, V, Vt = 2, 4, 1271, 1300
    s_full = logits((B, L + 1, V + 3), dtype)
    s = s_full[:, :-1, 1:V + 1]                        # row strides, unaligned start
    t_full = [logits((B, L + 1, Vt), dtype) for _ in range(3)]
    ts = [t_full[0][:, :-1], t_full[1][:, 1:], t_full[2][:, 1:, 3:]]  # columns >= V ignored
    ts.append(logits((B * L, 1, V), dtype))            # another [B', L'] split of the rows
    ws = [0.25, 0.25, 0.25, 0.25]
    labels = torch.randint(0, V, (B, L), device=DEV)
    check(s, ts, ws, labels, div, T=2.0, hw=0.3)


def test_all_rows_ignored():
    s = logits((2, 3, 77), torch.float32)
    ts = [logits((2, 3, 77), torch.float32) for _ in range(2)]
    labels = torch.full((6,), II, device=DEV)
    be = cuda()
    loss, stats = be.forward_rows_ensemble(s, ts, WEIGHTS[2], labels, 0, 0.0, 2.0, 1.0, 0.5, II)
    assert (loss == 0).all() and (stats == 0).all()
    grad = be.backward_rows_ensemble(torch.ones(6, device=DEV), s, ts, WEIGHTS[2], labels, stats,
                                     0, 0.0, 2.0, 1.0, 0.5, II)
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 3, 8])
@pytest.mark.parametrize("div", DIVS)
def test_identical_teachers_exact_zero(div, M, dtype):
    """Every teacher equal to the student, weights summing to 1 exactly: loss exactly 0."""
    s = logits((2, 2, 1000), dtype)
    ts = [s.clone() for _ in range(M)]
    loss, _ = cuda().forward_rows_ensemble(s, ts, WEIGHTS[M], None, DIV_ID[div],
                                           PARAM.get(div, 0.0), 2.0, 1.0, 0.0, II)
    assert (loss == 0).all(), loss


def test_single_teacher_matches_forward_rows():
    """M = 1: the single-teacher CUDA kernels' loss and statistics layout."""
    s = logits((2, 3, 900), torch.float32)
    t = logits((2, 3, 900), torch.float32)
    labels = torch.randint(0, 900, (6,), device=DEV)
    for div in DIVS:
        l1, s1 = cuda().forward_rows_ensemble(s, [t], [1.0], labels, DIV_ID[div],
                                              PARAM.get(div, 0.0), 2.0, 1.0, 0.5, II)
        l0, s0 = cuda().forward_rows(s, t, labels, DIV_ID[div], PARAM.get(div, 0.0), 2.0, 1.0,
                                     0.5, II)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        cols = [0, 1, 2, 3, 5, 6] + ([4] if div not in ("forward_kl", "reverse_kl") else [])
        torch.testing.assert_close(s1[:, cols], s0[:, cols], rtol=1e-5, atol=1e-6)


def test_stats_layout():
    """Teacher m's (raw max, log sum-exp of (t - max) / T) in columns 7 + 2(m - 1), 8 + 2(m - 1)."""
    T = 2.0
    s = logits((1, 2, 333), torch.float32)
    ts = [logits((1, 2, 333), torch.float32) for _ in range(3)]
    _, st = cuda().forward_rows_ensemble(s, ts, WEIGHTS[3], None, 2, 0.3, T, 1.0, 0.0, II)
    st = st.cpu()
    for m, t in enumerate(ts):
        t = t.cpu().double().reshape(2, -1)
        mx = t.max(-1).values
        lz = torch.logsumexp((t - mx[:, None]) / T, -1)
        c = 0 if m == 0 else 7 + 2 * (m - 1)
        torch.testing.assert_close(st[:, c].double(), mx, rtol=0, atol=0)
        torch.testing.assert_close(st[:, c + 1].double(), lz, rtol=1e-5, atol=1e-6)
