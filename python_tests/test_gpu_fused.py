"""The fused GPU training path: forward_rows_with_grad ("fused_grad", kdkernels::kd_rows_with_grad)
of the triton and cuda backends (CPU: the Triton interpreter, the CUDA host emulation).

One kernel (triton kd_fwd_grad_kernel, cuda forward_grad_kernel) runs the statistics pass (and, for the mixture divergences, the
loss / c pass), then the gradient pass, and writes the losses and grad_scale · d loss / d s.
Checked bitwise against the two-kernel path (forward_rows + backward_rows with
grad_loss = grad_scale: the same fp32 code) and against the float64 oracle, and that kd_loss takes
it when the student needs a gradient. CPU: Triton interpreter, small shapes, small blocks.
cuda runs twice: "cuda" as the launcher chooses (cluster_grad_kernel where a cluster applies,
compute capability >= 9: the emulation's default; it sums the statistics against the row's
maxima taken in its copy, so its loss and gradient are the two-kernel path's to rounding, not
bitwise) and "cuda-1cta" with the cluster path off (KDKERNELS_CUDA_CLUSTER_BYTES=0:
forward_grad_kernel, bitwise).
"""
import dataclasses

import pytest
import torch

import oracle
from conftest import assert_close, backend_params, device_for

import kdkernels as kd
from kdkernels import backends
from kdkernels import divergences as D
from kdkernels.ops import dense as ops
from kdkernels.tools import eager as reference



def _backend_cases():
    tri, cu = backend_params("triton", "cuda")
    return [pytest.param("triton", "", marks=tri.marks, id="triton"),
            pytest.param("cuda", "cluster", marks=cu.marks, id="cuda"),
            pytest.param("cuda", "one_cta", marks=cu.marks, id="cuda-1cta")]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize(("backend", "cuda_kernel"), _backend_cases())


DIVS = D.kernel_names()
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
GPU = torch.cuda.is_available()
DEVICE = str(device_for("triton"))  # cuda with a GPU, else cpu (interpreter / emulation)
assert device_for("triton") == device_for("cuda")
_CURRENT = ["triton", ""]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch, backend, cuda_kernel):
    monkeypatch.setenv("KDKERNELS_TRITON_BLOCK", "512" if not GPU else "4096")
    if cuda_kernel == "one_cta":
        monkeypatch.setenv("KDKERNELS_CUDA_CLUSTER_BYTES", "0")
    _CURRENT[:] = [backend, cuda_kernel]


def _launch():
    return backends.load(_CURRENT[0])


def _param(div):
    p = PARAMS.get(div, {})
    return p.get("beta", p.get("alpha", 0.0))


def _rand(shape, dtype, scale=3.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def _labels(n, V, frac_ignored=0.3):
    lab = torch.randint(0, V, (n,), device=DEVICE)
    lab[torch.rand(n, device=DEVICE) < frac_ignored] = -100
    return lab


def _both(s3, t3, labels, div, T=2.0, sw=1.0, hw=0.0, gs=None):
    """(loss, grad) of the fused launcher and of forward_rows + backward_rows(grad_scale)."""
    L = _launch()
    args = (s3, t3, labels, D.DIVERGENCES[div].id, _param(div), T, sw, hw, -100)
    loss_f, grad_f = L.forward_rows_with_grad(*args, gs)
    loss_2, stats = L.forward_rows(*args)
    n = s3.shape[0] * s3.shape[1]
    gl = gs if gs is not None else torch.ones(n, device=s3.device)
    grad_2 = L.backward_rows(gl.contiguous(), s3, t3, labels, stats, *args[3:])
    return loss_f, grad_f, loss_2, grad_2


def _oracle(s3, t3, labels, div, w, T=2.0, sw=1.0, hw=0.0):
    """Oracle rows and the gradient of Σ w · rows (float64); the eager formula in the input dtype
    for the three-way bound."""
    if labels is not None:
        labels = labels.reshape(s3.shape[:2]).cpu()
    kw = dict(temperature=T, labels=labels, hard_weight=hw, soft_weight=sw)
    okw = dict(divergence_name=div, **PARAMS.get(div, {}), **kw)
    V = s3.shape[-1]
    t3 = t3[..., :V]
    s64 = s3.detach().double().requires_grad_(True)
    rows = oracle.rows(s64, t3.detach().double(), **okw)
    (g,) = torch.autograd.grad((rows * w.double().reshape(rows.shape)).sum(), s64)
    sp = s3.detach().clone().requires_grad_(True)
    prow = reference.eager_kd_loss(sp, t3.detach(), div, reduction="none", **PARAMS.get(div, {}),
                                   **kw)
    (pg,) = torch.autograd.grad((prow * w.to(prow.dtype).reshape(prow.shape)).sum(), sp)
    return rows.detach().reshape(-1), g, prow.detach().reshape(-1), pg


def _same(a, b):
    """Bitwise equal, NaN where the other is NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _cluster():
    return _CURRENT == ["cuda", "cluster"]


def _own_sums(div):
    """The fused kernels that sum their statistics their own way: triton's forward KL (D summed
    in the gradient pass; forward_rows online in its one pass), reverse KL on triton and cuda
    (c = E_q[x] on fixed centres, the row's first-block maxima or, in cuda's cluster kernel, its
    maxima, subtracted from the same x in the gradient pass; forward_rows sums the re-centred
    online KL), and cuda's cluster kernel (its statistics against the row's maxima from the
    start)."""
    return (_CURRENT[0] == "triton" and div == "forward_kl") or div == "reverse_kl" or _cluster()


def _same_loss(a, b, div):
    """The fused loss against forward_rows': bitwise, except where the fused kernel sums its own
    way (``_own_sums``): then within a few fp32 ulps (inf and NaN where the other has them); both
    are also checked against the oracle."""
    if _own_sums(div):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6, equal_nan=True)
    else:
        _same(a, b)


def _grad_own_c(div):
    """The fused reverse KL (triton's kd_fwd_grad_kernel, cuda's forward_grad_kernel and
    cluster_grad_kernel): its c = E_q[x] is subtracted from the very x it was summed from, where
    the two-kernel path subtracts c = D (triton) or its own c' (cuda) from log-ratios rounded
    apart; on rows wider than a block at |logits| ~ 1e4, or with a first block far below the
    rest, the two differ by more than a rounding step (test_regressions.py::
    test_reverse_kl_one_hot_disjoint_logits_3e4_wide_row), so each is held to the oracle."""
    return div == "reverse_kl"


def _same_grad(a, b, div):
    """The fused gradient against backward_rows': bitwise (triton's forward KL too: its c = -1 is
    exact); the fused reverse KL (``_grad_own_c``) to the dtype's tolerance, each path also held
    to the oracle where there is one (``_check``); cuda's cluster kernel to the rounding of its
    statistics (a few fp32 ulps, then one rounding step of the gradient's dtype). NaN where the
    other has NaN."""
    if _grad_own_c(div):  # NaN where the other has NaN, else the dtype's tolerance
        nan = a.isnan()
        assert torch.equal(nan, b.isnan())
        assert_close(a[~nan].cpu(), b[~nan].cpu().double(), a.dtype,
                     what="fused against two-kernel grad")
    elif _cluster():
        assert torch.equal(a.isnan(), b.isnan())
        tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[a.dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=1e-6, equal_nan=True)
    else:
        _same(a, b)


def _check(s3, t3, labels, div, T=2.0, sw=1.0, hw=0.0, gs=None, plain=True, what=""):
    loss_f, grad_f, loss_2, grad_2 = _both(s3, t3, labels, div, T, sw, hw, gs)
    assert loss_f.dtype == torch.float32 and grad_f.dtype == s3.dtype
    assert grad_f.shape == s3.shape and grad_f.is_contiguous()
    # the same fp32 code on the same values: bitwise equal to the two-kernel path (the loss:
    # _same_loss)
    _same_loss(loss_f, loss_2, div)
    if not _grad_own_c(div):  # else each against the oracle below
        _same_grad(grad_f, grad_2, div)
    n = s3.shape[0] * s3.shape[1]
    w = gs if gs is not None else torch.ones(n, device=s3.device)
    rows, g, prow, pg = _oracle(s3, t3, labels, div, w.cpu(), T, sw, hw)
    dtype = s3.dtype
    assert_close(loss_f.cpu(), rows, dtype, prow if plain else None, what=f"{what} loss")
    assert_close(grad_f.cpu(), g, dtype, pg if plain else None, what=f"{what} grad")
    if _grad_own_c(div):
        assert_close(grad_2.cpu(), g, dtype, pg if plain else None, what=f"{what} grad (2k)")
    if labels is not None:
        ignored = (labels == -100).reshape(s3.shape[:2])
        assert (loss_f.reshape(s3.shape[:2])[ignored] == 0).all()
        assert (grad_f[ignored] == 0).all()


# ---- every divergence x dtype x labels / hard term, against the oracle and the two-kernel path --

@pytest.mark.parametrize("mode", ["plain", "masked", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_fused_matches(backend, div, dtype, mode):
    B, L, V = 2, 3, 1271  # odd V, not a multiple of the block: 3 blocks, the last one partial
    s, t = _rand((B, L, V), dtype), _rand((B, L, V), dtype)
    labels = None if mode == "plain" else _labels(B * L, V)
    gs = torch.rand(B * L, device=DEVICE) + 0.25
    _check(s, t, labels, div, hw=0.6 if mode == "hard" else 0.0, gs=gs,
           what=f"{div} {dtype} {mode}")


@pytest.mark.parametrize("div", DIVS)
def test_fused_t1_hard_only_and_tiny_V(backend, div, monkeypatch):
    """T = 1 with the hard term, the hard term alone (soft_weight = 0), V = 1 and V = 7, no
    grad_scale (ones)."""
    monkeypatch.setenv("KDKERNELS_TRITON_BLOCK", "64")
    s, t = _rand((1, 4, 300), torch.float32), _rand((1, 4, 300), torch.float32)
    lab = _labels(4, 300)
    _check(s, t, lab, div, T=1.0, hw=1.0, what="T=1")
    _check(s, t, lab, div, sw=0.0, hw=1.0, what="hard only")
    for V in (1, 7):
        s, t = _rand((2, 2, V), torch.float32), _rand((2, 2, V), torch.float32)
        _check(s, t, _labels(4, V), div, hw=0.5, what=f"V={V}")


@pytest.mark.parametrize("div", DIVS)
def test_fused_all_rows_ignored(backend, div):
    s, t = _rand((2, 3, 700), torch.bfloat16), _rand((2, 3, 700), torch.bfloat16)
    lab = torch.full((6,), -100, device=DEVICE)
    loss, grad, _, _ = _both(s, t, lab, div, hw=0.5, gs=torch.rand(6, device=DEVICE))
    assert (loss == 0).all() and (grad == 0).all()
    x = s.clone().requires_grad_(True)
    out = kd.kd_loss(x, t, div, labels=lab.reshape(2, 3), hard_weight=0.5, backend=backend,
                     **PARAMS.get(div, {}))
    out.backward()
    assert out.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("div", DIVS)
def test_fused_strided_views_and_wider_teacher(backend, div):
    """Row-strided student (logits[:, :-1]) and teacher views with a padded teacher vocabulary."""
    V = 1001
    s_full = _rand((2, 5, V), torch.bfloat16)
    t_full = _rand((2, 6, V + 13), torch.bfloat16)
    s3, t3 = s_full[:, :-1], t_full[:, 1:-1]
    assert not s3.is_contiguous() and not t3.is_contiguous()
    _check(s3, t3, _labels(8, V), div, hw=0.3, gs=torch.rand(8, device=DEVICE) + 0.5,
           what="strided")


@pytest.mark.parametrize("div", DIVS)
def test_fused_large_logits_and_neg_inf_columns(backend, div):
    V = 777
    s, t = _rand((1, 4, V), torch.float32, 1.0), _rand((1, 4, V), torch.float32, 1.0)
    big_s, big_t = s + 1e4, t - 1e4  # |logits| ~ 1e4: the shifted forms carry no rounding
    big_s[0, 1] *= -1.0
    _check(big_s, big_t, None, div, what="1e4", plain=False)
    s2, t2 = s.clone(), t.clone()
    cols = torch.tensor([0, 5, 511, 512, V - 1], device=DEVICE)  # at the 512-column block edges
    s2[..., cols] = float("-inf")  # masked vocabulary entries
    t2[..., cols] = float("-inf")
    lab = torch.tensor([3, -100, 3, 100], device=DEVICE)
    _check(s2, t2, lab, div, hw=0.4, what="-inf")
    # a one-hot teacher row and student-only -inf entries: no finite float64 autograd oracle for
    # every divergence here, so the fused path against the two-kernel one (bitwise) only
    t2[0, 2, :] = float("-inf")
    t2[0, 2, 3] = 0.0
    s2[0, 0, 100:200] = float("-inf")
    loss_f, grad_f, loss_2, grad_2 = _both(s2, t2, lab, div, hw=0.4)
    _same_loss(loss_f, loss_2, div)
    _same_grad(grad_f, grad_2, div)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [0.3, 2.0])
def test_fused_reverse_kl_first_block_far_below(backend, dtype, T):
    """The fused reverse KL sums c = E_q[x], x = (s - cs) - (t - ct), on the maxima of the row's
    first block (triton: kernels.py first_block_centres, BLOCK columns; cuda: kd_cuda.cu
    first_chunk_centres, THREADS * 16 bytes): the rounding of x grows with their distance from
    the likely tokens, so rows whose first block lies far below the rest (beyond 16·T:
    FAR_CENTRES, kFarCentres) sum c again on the row's maxima. Rows: the student's first block
    3000 below, the teacher's, both (3000 and 1000), the student's 12·T below (near the
    threshold). Without the second sum the fused loss strays from the two-kernel one here (and,
    in a sweep of such rows, from the oracle by up to 2.5x its fp32 bound); centred on column 0
    instead, test_contract.py::test_underflow_no_nan failed the same way. (cuda's cluster kernel
    centres on the row's maxima: never far.)"""
    if _CURRENT[0] == "triton":
        block = 512 if not GPU else 4096  # _small_blocks
    else:  # forward_grad_kernel: THREADS = 256 threads of one 16-byte chunk each
        block = 256 * (16 // dtype.itemsize)
    V = 2 * block + 37
    s, t = _rand((1, 4, V), torch.float32), _rand((1, 4, V), torch.float32)
    s[0, 0, :block] -= 3000.0
    t[0, 1, :block] -= 3000.0
    s[0, 2, :block] -= 3000.0
    t[0, 2, :block] -= 1000.0
    s[0, 3, :block] -= 12.0 * T
    lab = torch.tensor([3, V - 1, block, -100], device=DEVICE)
    _check(s.to(dtype), t.to(dtype), None, "reverse_kl", T=T, what="far")
    _check(s.to(dtype), t.to(dtype), lab, "reverse_kl", T=T, hw=0.5, what="far, hard")


# ---- the +inf-loss gradient rule (docs/precision.md, test_contract) in the fused kernels --------
# (skew KL / skew reverse KL at alpha = 0 reach the kernels as forward / reverse KL: checks)
INF_CASES = {
    # name: (divergence, which side gets the -inf, hard_weight, T, expected row-0 gradient)
    "forward_kl_student": ("forward_kl", "student", 0.0, 2.0, "finite"),
    "forward_kl_label_t1": ("forward_kl", "student", 1.0, 1.0, "finite"),
    "hard_only_label": ("forward_kl", "label", 1.0, 2.0, "finite"),
    "reverse_kl_teacher": ("reverse_kl", "teacher", 0.0, 2.0, "nan"),
    "reverse_kl_teacher_hard": ("reverse_kl", "teacher", 0.5, 2.0, "nan"),
    "reverse_kl_teacher_hard_t1": ("reverse_kl", "teacher", 0.5, 1.0, "nan"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(INF_CASES))
def test_fused_infinite_loss_gradient_rule(backend, case, dtype):
    """A row whose loss is +inf gets a gradient finite in every element (the -inf on the student
    side, at the label's column) or NaN in every element (the teacher's -inf under student mass),
    from the fused kernel as from the two-kernel path (bitwise); the other rows stay finite."""
    div, side, hw, T, expect = INF_CASES[case]
    V = 1271
    s, t = _rand((2, 3, V), dtype), _rand((2, 3, V), dtype)
    lab = _labels(6, V, frac_ignored=0.0)
    lab[5] = -100
    col = int(lab[0])
    (s if side in ("student", "label") else t)[0, 0, col] = float("-inf")
    sw = 0.0 if side == "label" else 1.0
    gs = torch.rand(6, device=DEVICE) + 0.5
    loss_f, grad_f, loss_2, grad_2 = _both(s, t, lab, div, T=T, sw=sw, hw=hw, gs=gs)
    _same_loss(loss_f, loss_2, div)
    _same_grad(grad_f, grad_2, div)
    assert loss_f[0] == float("inf"), loss_f[0]
    g0 = grad_f[0, 0]
    if expect == "nan":
        assert torch.isnan(g0).all(), f"{int(torch.isnan(g0).sum())} of {V} NaN"
    else:
        assert torch.isfinite(g0).all(), f"{int((~torch.isfinite(g0)).sum())} of {V} not finite"
    assert torch.isfinite(loss_f[1:]).all() and torch.isfinite(grad_f.reshape(6, V)[1:]).all()
    assert loss_f[5] == 0 and (grad_f[1, 2] == 0).all()


# ---- kd_loss takes the fused op on triton when the student needs a gradient --------------------

class _Counter:
    def __init__(self, monkeypatch):
        self.fused = self.plain = 0
        L = _launch()
        fused, plain = L.forward_rows_with_grad, L.forward_rows

        def count_fused(*a, **k):
            self.fused += 1
            return fused(*a, **k)

        def count_plain(*a, **k):
            self.plain += 1
            return plain(*a, **k)
        monkeypatch.setattr(L, "forward_rows_with_grad", count_fused)
        monkeypatch.setattr(L, "forward_rows", count_plain)


def _two_kernel(monkeypatch):
    """The backend without "fused_grad": kd_loss then runs kd_rows + kd_rows_backward."""
    spec = backends.BACKENDS[_CURRENT[0]]
    monkeypatch.setitem(backends.BACKENDS, _CURRENT[0],
                        dataclasses.replace(spec, features=spec.features - {"fused_grad"}))


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["as_hinted", "rescaled"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("div", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_kd_loss_uses_fused_op(backend, div, reduction, scale, monkeypatch):
    V = 900
    s, t = _rand((2, 4, V), torch.bfloat16), _rand((2, 4, V + 5), torch.bfloat16)
    lab = _labels(6, V).reshape(2, 3)
    kw = dict(temperature=2.0, labels=lab, hard_weight=0.3, reduction=reduction,
              backend=backend, **PARAMS.get(div, {}))

    def run():
        x = s.clone().requires_grad_(True)
        out = kd.kd_loss(x[:, :-1], t[:, :-1], div, **kw)
        (out.sum() * scale).backward()
        return out.detach(), x.grad

    counter = _Counter(monkeypatch)
    out_f, g_f = run()
    assert (counter.fused, counter.plain) == (1, 0)
    with torch.no_grad():
        kd.kd_loss(s[:, :-1].clone().requires_grad_(True), t[:, :-1], div, **kw)
    assert (counter.fused, counter.plain) == (1, 1)  # forward-only: the two-kernel forward
    with monkeypatch.context() as m:
        _two_kernel(m)
        out_2, g_2 = run()
    assert (counter.fused, counter.plain) == (1, 2)
    if backend == "triton" and div == "forward_kl":  # D summed in the fused gradient pass
        torch.testing.assert_close(out_f, out_2, rtol=2e-6, atol=1e-6)
    else:
        assert torch.equal(out_f, out_2)
    if scale == 1.0:
        assert torch.equal(g_f, g_2)
    else:  # rescaled once in fp32 from the hinted scale: one more bf16 rounding at most
        assert_close(g_f, g_2, torch.bfloat16)
    w = torch.ones(6)
    rows, g, prow, pg = _oracle(s[:, :-1], t[:, :-1], lab.reshape(-1), div, w, hw=0.3)
    n = int((lab != -100).sum())
    f = {"batchmean": scale / max(n, 1), "sum": scale, "none": scale}[reduction]
    assert_close(g_f[:, :-1].float().cpu(), g * f, torch.bfloat16, pg.double() * f, what="grad")


def test_rescale_in_place_skips_rows_with_ratio_one(backend):
    """rescale_rows_ touches only rows whose ratio is not 1 and equals scale_rows there."""
    L = _launch()
    g = _rand((2, 3, 300), torch.float32)  # fp32: bitwise (the interpreter rounds to bf16 by
    before = g.clone()                     # truncation, the GPU to nearest even)
    gs = torch.tensor([0.5, 0.5, 0.0, 2.0, 1.0, 0.25], device=DEVICE)
    gl = torch.tensor([0.5, 1.5, 3.0, 2.0, 7.0, 0.25], device=DEVICE)
    expected = torch.mul(before, torch.where(gs != 0, gl / gs, 0.0).reshape(2, 3, 1),
                         out=torch.empty_like(before))
    out = L.rescale_rows_(g, gl, gs)
    assert out is g
    assert torch.equal(g, expected)
    assert torch.equal(g[0, 0], before[0, 0]) and torch.equal(g[1, 2], before[1, 2])
    assert (g[0, 2] == 0).all()
    gb = before.to(torch.bfloat16)
    expected = torch.mul(gb, torch.where(gs != 0, gl / gs, 0.0).reshape(2, 3, 1),
                         out=torch.empty_like(gb))
    L.rescale_rows_(gb, gl, gs)
    torch.testing.assert_close(gb, expected, rtol=2.0 ** -7, atol=0)  # 1 bf16 ulp


def test_retained_graph_second_backward(backend):
    """G is rescaled in place and handed on by the first backward; a second backward of the
    retained graph computes its gradient afresh."""
    V = 500
    s, t = _rand((2, 3, V), torch.float32), _rand((2, 3, V), torch.float32)
    x = s.clone().requires_grad_(True)
    out = kd.kd_loss(x, t, "jsd", temperature=2.0, backend=backend)
    (g1,) = torch.autograd.grad(out * 2.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out * 5.0, x)
    _, g = oracle.loss_and_grad(s, t, divergence_name="jsd", temperature=2.0)
    assert_close(g1.cpu(), 2.0 * g, torch.float32)
    assert_close(g2.cpu(), 5.0 * g, torch.float32)


def test_opcheck_and_compile(backend):
    V = 37
    s = _rand((2, 3, V), torch.float32).requires_grad_(True)
    t = _rand((2, 3, V + 3), torch.float32)[..., :V]
    labels = _labels(6, V)
    gs = torch.rand(6, device=DEVICE) + 0.5
    scalars = (backend, 2, 0.4, 2.0, 1.0, 0.5, -100)
    # test_aot_dispatch_dynamic compares the op's outputs after an eager backward, and the eager
    # backward on triton rescales the second output G (the op's gradient buffer, which kd_loss
    # drops) in place; the compiled (functional) backward is checked against eager just below
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.kd_rows_with_grad, (s, t, labels) + scalars + (gs,),
                          test_utils=utils)
    torch.library.opcheck(ops.kd_rows_with_grad, (s, t, None) + scalars + (None,),
                          test_utils=utils)

    def f(x, t):
        return ops.kd_rows_with_grad(x * 1, t, None, backend, 2, 0.5, 2.0, 1.0, 0.0, -100,
                                     None)[0].sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(s, t).backward()
    got = s.grad.clone()
    s.grad = None
    f(s, t).backward()
    assert torch.equal(got, s.grad)


def test_launcher_rejects_bad_grad_scale(backend):
    s = _rand((1, 2, 10), torch.float32)
    with pytest.raises(ValueError, match="grad_scale|grad_loss"):
        _launch().forward_rows_with_grad(s, s, None, 0, 0.0, 1.0, 1.0, 0.0, -100,
                                         torch.ones(3, device=DEVICE))
