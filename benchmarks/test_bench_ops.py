"""Microbenchmarks of each op and implementation on small shapes (see conftest.py).

* ``test_loss_forward``: the loss alone under ``torch.no_grad`` (kdkernels: ``kd_rows``).
* ``test_loss_forward_backward``: one training step, gradient allocation included
  (kdkernels: ``kd_rows`` + ``kd_rows_backward``).
Each case first checks its result against the reference backend, so a wrong implementation
fails instead of producing a number.
"""
import functools

import pytest
import torch

from kdkernels.tools import bench
from kdkernels import divergences as D
from kdkernels import kd_loss

from conftest import DEVICE, N, V, impl_params, sync

# torch.compile costs seconds per divergence on CPU: benchmark it on forward_kl only there
CASES = [case for div in D.kernel_names()
         for case in impl_params(div, with_divergence=True,
                                 exclude=("compile",) if DEVICE == "cpu" and div != "forward_kl"
                                 else ())]


def _problem(div):
    return bench.Problem(div, "float32", N, V, DEVICE)


def _check(p, fn, s, t):
    ref = bench.reference_result(p, s, t)
    loss, grad = bench._step(fn, s, t)
    le, ge = bench._rel_errors(loss, grad, ref[0], ref[2])
    assert le <= bench.TOLERANCE[p.dtype] and ge <= bench.TOLERANCE[p.dtype], (le, ge)


@pytest.mark.parametrize("div, impl", CASES)
def test_loss_forward(benchmark, div, impl):
    p = _problem(div)
    s, t = p.inputs()
    fn = bench.implementations()[impl].build(p)
    _check(p, fn, s, t)

    def run():
        with torch.no_grad():
            fn(s, t)
        sync()
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("div, impl", CASES)
def test_loss_forward_backward(benchmark, div, impl):
    p = _problem(div)
    s, t = p.inputs()
    fn = bench.implementations()[impl].build(p)
    _check(p, fn, s, t)

    def run():
        bench._step(fn, s, t)
        sync()
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", impl_params("forward_kl", "bfloat16"))
def test_forward_backward_bf16_with_labels_and_strided_view(benchmark, impl):
    """A training-shaped call: bf16 [B, L+1, V] logits sliced to [:, :-1], labels with ignored
    rows, hard-label term. Only the kdkernels backends take these arguments."""
    if not impl.startswith("kd-"):
        pytest.skip(f"{impl} implements the plain soft loss only")
    B, L = 4, N // 4
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s_full = torch.randn(B, L + 1, V, generator=g, device=DEVICE).to(torch.bfloat16)
    t_full = torch.randn(B, L + 1, V, generator=g, device=DEVICE).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, L), generator=g, device=DEVICE)
    labels[:, ::5] = -100
    s, t = s_full[:, :-1], t_full[:, :-1]
    f = functools.partial(kd_loss, divergence="forward_kl", temperature=2.0, labels=labels,
                          hard_weight=0.5, backend=impl[3:])
    ref = functools.partial(kd_loss, divergence="forward_kl", temperature=2.0, labels=labels,
                            hard_weight=0.5, backend="reference")
    l1, g1 = bench._step(f, s, t)
    l2, g2 = bench._step(ref, s, t)
    le, ge = bench._rel_errors(l1, g1.reshape(-1, V), l2, g2.reshape(-1, V))
    assert le <= bench.TOLERANCE["bfloat16"] and ge <= bench.TOLERANCE["bfloat16"], (le, ge)

    def run():
        bench._step(f, s, t)
        sync()
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
