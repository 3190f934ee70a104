"""The CUDA backend (kdkernels._C_cuda, backend="cuda") against the float64 oracle and, where
available, against the Triton backend. On a GPU the real kernels; without one, with
KDKERNELS_CUDA_EMULATE=1 (conftest sets it), the same kernels on CPU tensors under the host
emulation of the CUDA execution model (kdkernels/backends/cuda_emulate.py)."""
import pytest
import torch

import kdkernels as kd
from kdkernels import backends, divergences
from kdkernels.backends import compiled as cpp
from kdkernels.backends import cuda_emulate

import oracle
from conftest import assert_close, cuda_emulated

pytestmark = pytest.mark.gpu
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not torch.cuda.is_available():
    pytestmark = [] if cuda_emulated() else [pytest.mark.gpu, pytest.mark.skip(
        reason="no CUDA GPU on this machine (and no CUDA emulation: KDKERNELS_CUDA_EMULATE=1)")]
elif cpp.unavailable_reason("cuda"):
    pytestmark = [pytest.mark.gpu,
                  pytest.mark.skip(reason=f"CUDA backend unavailable: {cpp.unavailable_reason('cuda')}")]

DIVS = divergences.kernel_names()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARAM = {"jsd": ("beta", 0.3), "skew_kl": ("alpha", 0.2), "skew_reverse_kl": ("alpha", 0.2)}


def _kw(div, **extra):
    kw = dict(divergence=div, **extra)
    if div in PARAM:
        kw[PARAM[div][0]] = PARAM[div][1]
    return kw


def _run(backend, s, t, w, kw):
    x = s.detach().requires_grad_(True)
    rows = kd.kd_loss(x, t, reduction="none", backend=backend, **kw)
    (g,) = torch.autograd.grad((rows * w).sum(), x)
    return rows.detach(), g


def check(s, t, **kw):
    w = torch.rand(s.shape[:-1], device=s.device) + 0.5
    rows, g = _run("cuda", s, t, w, kw)
    ref_rows, ref_g = _run("reference", s, t, w, kw)
    okw = {k: v for k, v in kw.items() if k != "divergence"}
    s64 = s.detach().double().requires_grad_(True)
    o_rows = oracle.rows(s64, t.detach(), divergence_name=kw["divergence"], **okw)
    (o_g,) = torch.autograd.grad((o_rows * w.double()).sum(), s64)
    if torch.isnan(o_g).any():  # oracle autograd NaN at underflowing mixtures: use float64 reference
        o_g = _run("reference", s.double(), t.double(), w.double(), kw)[1]
    assert g.dtype == s.dtype and g.is_contiguous()
    assert_close(rows, o_rows.detach(), s.dtype, plain=ref_rows, what="values")
    assert_close(g, o_g, s.dtype, plain=ref_g, what="gradient")
    if backends.availability("triton") is None and DEV == "cuda":  # not the interpreter
        t_rows, t_g = _run("triton", s, t, w, kw)
        assert_close(rows, o_rows.detach(), s.dtype, plain=t_rows, what="values vs triton")
        assert_close(g, o_g, s.dtype, plain=t_g, what="gradient vs triton")
    return rows, g


def logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("V", [1, 7, 1271, 32000, 50257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_matrix(div, dtype, V):
    s, t = logits((2, 3, V), dtype), logits((2, 3, V), dtype)
    labels = torch.randint(0, V, (2, 3), device=DEV)
    labels[0, 1] = -100
    rows, g = check(s, t, **_kw(div, temperature=2.0, labels=labels, hard_weight=0.4))
    assert rows[0, 1] == 0 and (g[0, 1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_huge_strided_padded(div, dtype):
    B, L, V, Vt = 2, 4, 1271, 1300
    s_full, t_full = logits((B, L + 1, V), dtype), logits((B, L + 1, Vt), dtype, 1e3)
    s_full[..., 7] = float("-inf")
    t_full[..., 7] = float("-inf")
    s, t = s_full[:, :-1], t_full[:, 1:]
    rows, g = _run("cuda", s, t, torch.ones(B, L, device=DEV), _kw(div, temperature=2.0))
    assert torch.isfinite(rows).all() and (g[..., 7] == 0).all()
    exp = oracle.rows(s.double(), t.double(), divergence_name=div, temperature=2.0,
                      **{k: v for k, v in _kw(div).items() if k != "divergence"})
    assert_close(rows, exp, dtype, plain=_run("reference", s, t, torch.ones(B, L, device=DEV),
                                              _kw(div, temperature=2.0))[0])


def test_all_rows_ignored_and_opcheck():
    s, t = logits((2, 3, 77), torch.float32), logits((2, 3, 77), torch.float32)
    labels = torch.full((2, 3), -100, device=DEV)
    x = s.clone().requires_grad_(True)
    out = kd.kd_loss(x, t, labels=labels, hard_weight=1.0, backend="cuda")
    (g,) = torch.autograd.grad(out, x)
    assert float(out) == 0.0 and (g == 0).all()
    op = torch.ops.kdkernels_C if DEV == "cuda" else cuda_emulate.library()
    torch.library.opcheck(op.kd_rows_fwd.default,
                          (s, t, labels.view(-1), 0, 0.0, 2.0, 1.0, 0.5, -100))
