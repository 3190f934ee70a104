"""The Triton backend against the float64 oracle (CPU: Triton interpreter, small shapes).

The edge cases every backend shares are in test_contract.py. Blocks are made small
(KDKERNELS_TRITON_BLOCK) so that V = 1271 and V = 5003 span several blocks
and the online merging of (max, sum-exp) across blocks is exercised.
"""
import warnings

import pytest
import torch

import oracle
from conftest import assert_close, backend_params, device_for

import kdkernels as kd
from kdkernels import backends
from kdkernels.ops import dense as ops
from kdkernels.tools import eager as reference
from kdkernels import divergences as D

pytestmark = pytest.mark.parametrize("backend", backend_params("triton"))

DIVS = D.kernel_names()
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
GPU = torch.cuda.is_available()
DEVICE = str(device_for("triton"))  # cuda with a GPU, else cpu (the interpreter)
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setenv("KDKERNELS_TRITON_BLOCK", "1024" if not GPU else "4096")


def _oracle_kw(div, **kw):
    p = PARAMS.get(div, {})
    out = dict(divergence_name=div, **kw)
    if "beta" in p:
        out["beta"] = p["beta"]
    if "alpha" in p:
        out["alpha"] = p["alpha"]
    return out


def _oracle_rows_and_grad(s, t, w, div, **kw):
    """Oracle per-row losses and the gradient of Σ w·rows w.r.t. s (float64)."""
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double()
    rows = oracle.rows(s64, t64, **_oracle_kw(div, **kw))
    (g,) = torch.autograd.grad((rows * w.double()).sum(), s64)
    return rows.detach(), g


def _plain_rows_and_grad(s, t, w, div, **kw):
    """What plain PyTorch gives in the input dtype (the eager formula), for the three-way bound."""
    s_ = s.detach().clone().requires_grad_(True)
    rows = reference.eager_kd_loss(s_, t.detach(), div, reduction="none", **PARAMS.get(div, {}),
                                   **kw)
    (g,) = torch.autograd.grad((rows * w.to(rows.dtype)).sum(), s_)
    return rows.detach(), g


def _check(s, t, div, backend, labels=None, hard_weight=0.0, temperature=2.0, plain=True,
           what=""):
    """kd_loss(reduction='none') values and the gradient of a random weighting of the rows."""
    dtype = s.dtype
    s = s.detach().requires_grad_(True)
    kw = dict(temperature=temperature, labels=labels, hard_weight=hard_weight)
    rows = kd.kd_loss(s, t, div, reduction="none", backend=backend, **PARAMS.get(div, {}), **kw)
    w = torch.rand(rows.shape, device=rows.device) + 0.5
    (rows * w).sum().backward()
    assert rows.dtype == torch.float32 and s.grad.dtype == dtype and s.grad.shape == s.shape
    exp_rows, exp_grad = _oracle_rows_and_grad(s, t, w, div, **kw)
    pr = pg = None
    if plain:
        pr, pg = _plain_rows_and_grad(s, t, w, div, **kw)
    e1 = assert_close(rows, exp_rows, dtype, pr, what=f"{what} loss")
    e2 = assert_close(s.grad, exp_grad, dtype, pg, what=f"{what} grad")
    if labels is not None:
        ignored = labels == -100
        assert (rows.detach()[ignored] == 0).all()
        assert (s.grad[ignored] == 0).all()
    return e1, e2


def _rand(shape, dtype, scale=3.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def _labels(shape, V, frac_ignored=0.3):
    lab = torch.randint(0, V, shape, device=DEVICE)
    lab[torch.rand(shape, device=DEVICE) < frac_ignored] = -100
    return lab


# ---- values and gradients over the grid ------------------------------------------------------

@pytest.mark.parametrize("mode", ["plain", "masked", "hard"])
@pytest.mark.parametrize("V", [1, 7, 1271, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("div", DIVS)
def test_values_and_grads(backend, div, dtype, V, mode):
    shape = (2, 3)
    s, t = _rand(shape + (V,), dtype), _rand(shape + (V,), dtype)
    labels = None if mode == "plain" else _labels(shape, V)
    _check(s, t, div, backend, labels=labels, hard_weight=0.7 if mode == "hard" else 0.0,
           what=f"{div} {dtype} V={V} {mode}")


@pytest.mark.parametrize("div", DIVS)
def test_fp16(backend, div):
    s, t = _rand((2, 3, 1271), torch.float16), _rand((2, 3, 1271), torch.float16)
    _check(s, t, div, backend, labels=_labels((2, 3), 1271), hard_weight=0.5, what=div)


@pytest.mark.parametrize("div", DIVS)
def test_block_boundaries_and_params(backend, div, monkeypatch):
    """A tiny block (many blocks per row), T = 1 (student stats shared with the hard term) and the
    skew extremes α = 0."""
    monkeypatch.setenv("KDKERNELS_TRITON_BLOCK", "64")
    s, t = _rand((1, 4, 300), torch.float32), _rand((1, 4, 300), torch.float32)
    _check(s, t, div, backend, labels=_labels((1, 4), 300), hard_weight=1.0, temperature=1.0)
    if div.startswith("skew"):
        s_ = s.detach().requires_grad_(True)
        rows = kd.kd_loss(s_, t, div, alpha=0.0, reduction="none", backend=backend)
        rows.sum().backward()
        exp = oracle.rows(s.double(), t.double(), divergence_name=div, alpha=0.0)
        assert_close(rows, exp, torch.float32)
        exp_g = oracle.loss_and_grad(s, t, divergence_name=div, alpha=0.0, reduction="sum")[1]
        assert_close(s_.grad, exp_g, torch.float32)


def test_label_out_of_range_is_nan(backend):
    """Below the functional range check: the kernel itself never reads out of bounds and gives a
    NaN hard term for a label outside [0, V) that is not ignore_index."""
    launch = backends.load("triton")
    V = 50
    s, t = _rand((1, 3, V), torch.float32), _rand((1, 3, V), torch.float32)
    labels = torch.tensor([V, -100, 3], device=DEVICE)
    loss, _ = launch.forward_rows(s, t, labels, 0, 0.0, 1.0, 1.0, 1.0, -100)
    assert torch.isnan(loss[0]) and loss[1] == 0 and torch.isfinite(loss[2])


# ---- the in-place gradient --------------------------------------------------------------------

@pytest.mark.parametrize("div", ["forward_kl", "jsd", "tvd"])
def test_grad_inplace_matches(backend, div):
    V = 1271
    x = _rand((2, 5, V), torch.bfloat16).requires_grad_(True)
    t = _rand((2, 4, V + 9), torch.bfloat16)
    labels = _labels((2, 4), V)
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.4, **PARAMS.get(div, {}))
    kd.kd_loss(x[:, :-1] * 1, t, div, backend=backend, **kw).backward()
    expected = x.grad.clone()
    x.grad = None
    logits = x * 1  # a non-leaf standing in for an lm_head output
    out = kd.kd_loss(logits[:, :-1], t, div, backend=backend, grad_inplace=True, **kw)
    out.backward()
    assert torch.equal(x.grad, expected)
    # The logits' storage now holds their gradient (the documented destruction).
    assert torch.equal(logits[:, :-1].detach(), expected[:, :-1])
    # The module takes the flag too.
    crit = kd.KDLoss(div, backend=backend, **{k: v for k, v in kw.items() if k != "labels"})
    crit_inplace = kd.KDLoss(div, backend=backend, grad_inplace=True,
                             **{k: v for k, v in kw.items() if k != "labels"})
    x.grad = None
    crit(x[:, 1:] * 1, t, labels).backward()
    expected = x.grad.clone()
    x.grad = None
    crit_inplace(x[:, 1:] * 1, t, labels).backward()
    assert torch.equal(x.grad, expected)


def test_grad_inplace_argument_checked(backend):
    s = _rand((1, 2, 10), torch.float32)
    with pytest.raises(TypeError, match="grad_inplace"):
        kd.kd_loss(s, s, backend=backend, grad_inplace=1)
    with pytest.raises(TypeError, match="grad_inplace"):
        kd.KDLoss(grad_inplace="yes")


# ---- launcher checks, opcheck ----------------------------------------------------------------

def test_launcher_rejects_bad_input(backend):
    launch = backends.load("triton")
    s = _rand((1, 2, 10), torch.float32)
    with pytest.raises(TypeError, match="student"):
        launch.forward_rows(s.double(), s.double(), None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="student"):
        launch.forward_rows(s[0], s[0], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="teacher"):
        launch.forward_rows(s, s[..., :5], None, 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(TypeError, match="labels"):
        launch.forward_rows(s, s, torch.zeros(2, dtype=torch.int32), 0, 0.0, 1.0, 1.0, 0.0, -100)
    with pytest.raises(ValueError, match="unit stride"):
        launch.forward_rows(s.transpose(1, 2).contiguous().transpose(1, 2), s, None,
                            0, 0.0, 1.0, 1.0, 0.0, -100)


def test_empty_batch(backend):
    s = torch.zeros((2, 0, 10), device=DEVICE, requires_grad=True)
    out = kd.kd_loss(s, s.detach(), backend=backend)
    out.backward()
    assert out.item() == 0.0 and s.grad.shape == s.shape


@pytest.mark.parametrize("inplace", [False, True], ids=["kd_rows", "kd_rows_grad_inplace"])
def test_opcheck(backend, inplace):
    V = 37
    s = _rand((2, 3, V), torch.float32).requires_grad_(True)
    t = _rand((2, 3, V + 3), torch.float32)[..., :V]
    labels = _labels((2, 3), V).reshape(-1)
    fwd = ops.kd_rows
    bwd = ops.kd_rows_backward_inplace if inplace else ops.kd_rows_backward
    scalars = ("triton", 2, 0.4, 2.0, 1.0, 0.5, -100)
    torch.library.opcheck(fwd, (s, t, labels) + scalars + (inplace,))
    torch.library.opcheck(fwd, (s, t, None) + scalars[:4] + (1.0, 0.0, -100, inplace))
    # the teacher requiring grad (its backward: ops.dense.teacher_grad, before the in-place one)
    t_leaf = t.detach().clone().requires_grad_(True)
    torch.library.opcheck(fwd, (s.detach().clone().requires_grad_(True), t_leaf, labels)
                          + scalars + (inplace,))
    stats = fwd(s, t, labels, *scalars, inplace)[1].detach()
    gl = torch.rand(6, device=DEVICE)
    torch.library.opcheck(bwd, (gl, s.detach().clone(), t, labels, stats) + scalars)


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_teacher_gradient_with_grad_inplace(backend, div):
    """grad_inplace overwrites the student logits with their gradient; the teacher's gradient is
    computed first, from the intact logits."""
    s = _rand((2, 3, 301), torch.bfloat16)
    t = _rand((2, 3, 301), torch.bfloat16)
    got = []
    for inplace in (False, True):
        x, y = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        kd.kd_loss(x * 1, y, div, temperature=2.0, backend=backend,
                   grad_inplace=inplace).backward()
        got.append((x.grad, y.grad))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


# ---- GPU only ---------------------------------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_memory(backend, monkeypatch, inplace):
    """Extra peak memory of forward + backward at N = 4096, V = 128256 bf16 is at most one
    gradient buffer + 1% (the in-place gradient: O(N) only)."""
    monkeypatch.delenv("KDKERNELS_TRITON_BLOCK", raising=False)
    N, V = 4096, 128256
    s = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    x = s * 1 if inplace else s
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = kd.kd_loss(x, t, temperature=2.0, backend=backend, grad_inplace=inplace)
    g, = torch.autograd.grad(loss, x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    one_grad = N * V * 2
    limit = 0.01 * one_grad + (0 if inplace else one_grad)
    assert extra <= limit, f"extra peak {extra / 2**20:.1f} MiB > {limit / 2**20:.1f} MiB"
    del g


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_compile_fullgraph(backend):
    s = torch.randn(4, 64, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 64, 32000, device="cuda", dtype=torch.bfloat16)

    @torch.compile(fullgraph=True)
    def step(s, t):
        return kd.kd_loss(s, t, "jsd", temperature=2.0, backend=backend)

    out = step(s, t)
    out.backward()
    exp, g = oracle.loss_and_grad(s, t, divergence_name="jsd", temperature=2.0)
    assert_close(out.detach().cpu(), exp.cpu(), torch.bfloat16)
    assert_close(s.grad.cpu(), g.cpu(), torch.bfloat16)


@pytest.mark.parametrize("inplace", [False, True], ids=["kd_rows", "kd_rows_grad_inplace"])
def test_compile_fullgraph_ops(backend, inplace):
    """The custom ops trace under torch.compile(fullgraph=True) (aot_eager: no C++ compile here)
    and give the eager gradient."""
    op = ops.kd_rows
    s = _rand((2, 3, 300), torch.float32).requires_grad_(True)
    t = _rand((2, 3, 300), torch.float32)

    def f(x, t):
        return op(x * 1, t, None, "triton", 2, 0.5, 2.0, 1.0, 0.0, -100, inplace)[0].sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(s, t).backward()
    got = s.grad.clone()
    s.grad = None
    f(s, t).backward()
    assert torch.equal(got, s.grad)


# ---- teacher ensembles (ensemble_kernels.py), the launcher functions directly -----------------
# (through kd_loss in test_contract.py::test_ensemble; here also on the triton 3.6 CI pass)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [2, 5])
@pytest.mark.parametrize("div", DIVS)
def test_ensemble_launchers(backend, div, M, dtype):
    from kdkernels.backends.triton import launch
    d = D.get(div)
    param = d.check_param(PARAMS.get(div, {}).get(d.param) if d.param else None)
    B, L, V = 2, 3, 1100
    s = (torch.randn(B, L, V, device=DEVICE) * 4).to(dtype)
    ts = [(torch.randn(B, L + 1, V + 3, device=DEVICE) * 4).to(dtype)[:, 1:] for _ in range(M)]
    s[..., 9] = float("-inf")
    for t in ts:
        t[..., 9] = float("-inf")
    ts[0][..., 10] = float("-inf")
    w = (torch.rand(M, dtype=torch.float64) + 0.2)
    w = (w / w.sum()).tolist()
    lab = torch.randint(0, V, (B * L,), device=DEVICE)
    lab[2] = -100
    args = (d.id, param, 1.7, 0.8, 0.3, -100)
    loss, stats = launch.forward_rows_ensemble(s, ts, w, lab, *args)
    assert stats.shape == (B * L, backends.STATS_WIDTH + 2 * (M - 1))
    gl = torch.rand(B * L, device=DEVICE) + 0.5
    grad = launch.backward_rows_ensemble(gl, s, ts, w, lab, stats, *args)
    s64 = s.detach().double().requires_grad_(True)
    kw = dict(temperature=1.7, labels=lab.view(B, L), hard_weight=0.3, soft_weight=0.8)
    exp = oracle.rows(s64, [t.double() for t in ts], **_oracle_kw(div, **kw),
                      teacher_weights=w).reshape(-1)
    (eg,) = torch.autograd.grad((exp * gl.double()).sum(), s64)
    s_ = s.detach().clone().requires_grad_(True)
    pr = kd.kd_loss(s_, ts, div, reduction="none", backend="reference", teacher_weights=w, **kw,
                    **PARAMS.get(div, {})).reshape(-1)
    (pg,) = torch.autograd.grad((pr * gl.to(pr.dtype)).sum(), s_)
    assert_close(loss, exp.detach(), dtype, pr.detach(), what="loss")
    assert_close(grad, eg, dtype, pg, what="grad")
    assert loss[2] == 0 and (grad.reshape(B * L, V)[2] == 0).all()
