"""Bad input gets a clear error naming the argument; backend selection; the CLI."""
import subprocess
import sys

import pytest
import torch

import kdkernels as kd
from kdkernels import backends

S = torch.randn(4, 10)
T = torch.randn(4, 10)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(student_logits=torch.randint(0, 5, (4, 10))), TypeError, "student_logits"),
    (dict(teacher_logits=[1.0, 2.0]), TypeError, "teacher_logits"),
    (dict(teacher_logits=T.double()), TypeError, "dtype"),
    (dict(teacher_logits=torch.randn(4, 9)), ValueError, "vocabulary"),
    (dict(teacher_logits=torch.randn(5, 10)), ValueError, "leading shape"),
    (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, "V >= 1"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(divergence=3), TypeError, "divergence"),
    (dict(divergence="jsd", beta=0.0), ValueError, "forward_kl"),
    (dict(divergence="jsd", beta=1.0), ValueError, "beta"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    (dict(divergence="skew_kl", alpha=1.0), ValueError, "alpha"),
    (dict(divergence="skew_reverse_kl", alpha=-0.1), ValueError, "alpha"),
    (dict(divergence="skew_kl", alpha=1e-53), ValueError, "fp32"),
    (dict(divergence="jsd", beta=1 - 1e-9), ValueError, "fp32"),
    (dict(divergence="forward_kl", beta=0.3), ValueError, "beta"),
    (dict(divergence="jsd", alpha=0.3), ValueError, "alpha"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="fastest"), ValueError, "backend"),
    (dict(backend="cuda"), ValueError, "backend='cuda'"),
    (dict(backend="reference", soft_weight=-1.0), ValueError, "soft_weight"),
    (dict(hard_weight=float("nan")), ValueError, "hard_weight"),
    (dict(hard_weight=1.0), ValueError, "labels"),
    (dict(labels=torch.zeros(4)), TypeError, "labels"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels must lie in [0, 10)"),
    (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "ignore_index"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
])
def test_bad_inputs(kwargs, exc, needle, monkeypatch):
    monkeypatch.delenv("KDKERNELS_CUDA_EMULATE", raising=False)  # backend="cuda" on CPU: an error
    args = dict(student_logits=S, teacher_logits=T)
    args.update(kwargs)
    with pytest.raises(exc, match=None) as info:
        kd.kd_loss(**args)
    assert needle in str(info.value), str(info.value)


def test_devices_must_match():
    meta = torch.empty(4, 10, device="meta")
    with pytest.raises(ValueError, match="teacher_logits are on meta"):
        kd.kd_loss(S, meta)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="beta"):
        kd.KDLoss(divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="reduction"):
        kd.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        kd.KDLoss(temperature=0)


def test_cuda_on_cpu_tensors_only_under_emulation(monkeypatch):
    """backend="cuda" on CPU tensors: a clear error naming KDKERNELS_CUDA_EMULATE, and with it
    set (a test tool, kdkernels/backends/cuda_emulate.py) the emulated kernels; "auto" never picks it."""
    monkeypatch.delenv("KDKERNELS_CUDA_EMULATE", raising=False)
    with pytest.raises(ValueError, match="KDKERNELS_CUDA_EMULATE=1"):
        kd.kd_loss(S, T, backend="cuda")
    monkeypatch.setenv("KDKERNELS_CUDA_EMULATE", "1")
    assert backends.choose("auto", torch.device("cpu"), torch.float32) != "cuda"
    from kdkernels.backends import cuda_emulate
    if torch.cuda.is_available() or cuda_emulate.unavailable_reason():
        pytest.skip("no CUDA emulation here")
    out = kd.kd_loss(S, T, backend="cuda")
    torch.testing.assert_close(out, kd.kd_loss(S, T, backend="reference"), rtol=1e-5, atol=1e-6)


def test_auto_backend_falls_back_and_float64_uses_reference():
    assert backends.choose("auto", torch.device("cpu"), torch.float64) == "reference"
    name = backends.choose("auto", torch.device("cpu"), torch.float32)
    assert name in ("cpu", "reference")
    if backends.availability("cpu") is None:
        assert name == "cpu"


def test_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(backends._AVAILABILITY, "cpu", "kdkernels._C not built (test)")
    with pytest.raises(RuntimeError, match="kdkernels._C not built"):
        kd.kd_loss(S, T, backend="cpu")
    assert backends.choose("auto", torch.device("cpu"), torch.float32) == "reference"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kdkernels", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_info():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    assert "reference" in r.stdout and "available" in r.stdout and "torch" in r.stdout


def test_cli_check_small():
    r = _cli("check", "--rows", "16", "--vocab", "300", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("reference") >= 6 and "worst relative" in r.stdout


# ---- labels that are non-contiguous views (issue 16) ---------------------------------------------

from conftest import backend_params as _backend_params, cpu as _cpu, on as _on  # noqa: E402


@pytest.mark.parametrize("backend", _backend_params("reference", "cpu", "triton", "cuda"))
def test_strided_label_views_on_every_backend(backend):
    """kd_loss(s[:, -1], t[:, -1], labels=y[:, -1]): a label view of stride L is accepted (one
    copy of the N labels at most, never of the logits) and gives the same loss and gradient as
    contiguous labels."""
    g = torch.Generator().manual_seed(4)
    B, L, V = 3, 5, 97
    s = _on(backend, torch.randn(B, L, V, generator=g)).requires_grad_(True)
    t = _on(backend, torch.randn(B, L, V, generator=g))
    y = torch.randint(0, V, (B, L), generator=g)
    y[1, -1] = -100
    y = _on(backend, y)
    for sl in (lambda x: x[:, -1], lambda x: x[:, 1::2]):
        assert not sl(y).is_contiguous()
        kw = dict(divergence="jsd", temperature=2.0, hard_weight=0.4, reduction="none",
                  backend=backend)
        a = kd.kd_loss(sl(s), sl(t), labels=sl(y), **kw)
        (ga,) = torch.autograd.grad(a.sum(), s)
        b = kd.kd_loss(sl(s), sl(t), labels=sl(y).contiguous(), **kw)
        (gb,) = torch.autograd.grad(b.sum(), s)
        assert torch.equal(_cpu(a), _cpu(b)) and torch.equal(_cpu(ga), _cpu(gb))


def test_torchtune_chunked_one_position_chunks():
    """The torchtune chunked loss with as many chunks as positions: every label chunk is a
    [B, 1] view of stride L."""
    from kdkernels.integrations import torchtune as kd_tt
    g = torch.Generator().manual_seed(5)
    B, L, V = 2, 4, 50
    s = torch.randn(B, L, V, generator=g)
    t = torch.randn(B, L, V, generator=g)
    y = torch.randint(0, V, (B, L), generator=g)
    y[0, 2] = -100
    chunked = kd_tt.ForwardKLWithChunkedOutputLoss(num_output_chunks=L)
    got = chunked(list(s.chunk(L, dim=1)), list(t.chunk(L, dim=1)), y)
    ref = kd.kd_loss(s, t, labels=y, backend="reference")
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("n", [7, 7.0, torch.tensor(7)])
def test_num_items_in_batch_is_refused_where_it_does_not_apply(reduction, n):
    """Issue 21: reduction="sum" (or "none") with num_items_in_batch used to ignore the count
    silently. Every loss entry point now refuses the combination, naming both arguments."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    labels = torch.randint(0, 10, (2, 3), generator=g)
    h, w = torch.randn(2, 3, 4, generator=g), torch.randn(10, 4, generator=g)
    idx = torch.topk(t, 4, dim=-1).indices
    lp = torch.log_softmax(t, -1).gather(-1, idx)
    calls = {
        "kd_loss": lambda **kw: kd.kd_loss(s, t, labels=labels, **kw),
        "KDLoss": lambda **kw: kd.KDLoss(**kw)(s, t, labels),
        "fused_linear_kd_loss": lambda **kw: kd.fused_linear_kd_loss(h, w, h, w, labels=labels, **kw),
        "sparse_kd_loss": lambda **kw: kd.sparse_kd_loss(s, idx, lp, labels=labels, **kw),
        "feature_loss": lambda **kw: kd.feature_loss(h, h.flip(-1), labels=labels, **kw),
    }
    for name, call in calls.items():
        if name == "KDLoss":
            with pytest.raises(ValueError) as info:
                kd.KDLoss(reduction=reduction)(s, t, labels, num_items_in_batch=n)
        else:
            with pytest.raises(ValueError) as info:
                call(reduction=reduction, num_items_in_batch=n)
        msg = str(info.value)
        assert "num_items_in_batch" in msg and f"reduction={reduction!r}" in msg, (name, msg)
        # the same call with batchmean divides the sum by n
        if name != "KDLoss":
            total = call(reduction="sum")
            torch.testing.assert_close(call(reduction="batchmean", num_items_in_batch=n),
                                       total / 7, msg=name)


def test_readme_quickstart_batchmean_claim():
    """README quickstart: equal to F.kl_div(batchmean)·T² for [N, V]; for [B, L, V] PyTorch divides
    by B and kdkernels by the counted tokens B·L, a factor L; "sum" agrees in every shape."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    T = 2.0
    for shape in [(6, 50), (2, 3, 50)]:
        s, t = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        ref = lambda red: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                                   log_target=True, reduction=red) * T * T
        L = 1 if len(shape) == 2 else shape[1]
        torch.testing.assert_close(kd.kd_loss(s, t, temperature=T), ref("batchmean") / L)
        torch.testing.assert_close(kd.kd_loss(s, t, temperature=T, reduction="sum"), ref("sum"))
