"""Max error of every available backend against the float64 oracle, per input dtype.

    TRITON_INTERPRET=1 python benchmarks/accuracy.py            # CPU: reference, cpu, triton (interpreter)

For each backend and dtype it runs every kernel divergence on random logits (scale 4, V=1271 and
5003, T=2, labels with ignored rows, hard_weight 0.5) and prints max |err| / max |expected| of the
per-row loss and of the student gradient, next to the same figure for plain PyTorch evaluating the
formula in float32 on the same inputs (the yardstick of the error bound in python_tests/conftest.py).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python_tests"))

import kdkernels as kd  # noqa: E402
from kdkernels import backends, divergences  # noqa: E402
import oracle  # noqa: E402

PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def rel(a, e):
    return float((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-30))


def main():
    names = [n for n in backends.names() if backends.availability(n) is None
             and "cpu" in backends.BACKENDS[n].devices]
    print(f"{'backend':<10} {'dtype':<9} {'loss err':>9} {'grad err':>9} {'plain32 loss':>13} "
          f"{'plain32 grad':>13}")
    for name in names:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            worst = [0.0] * 4
            for V in (1271, 5003):
                for div in divergences.kernel_names():
                    g = torch.Generator().manual_seed(V)
                    s = (torch.randn(8, V, generator=g) * 4).to(dtype)
                    t = (torch.randn(8, V + 3, generator=g) * 4).to(dtype)
                    lab = torch.randint(0, V, (8,), generator=g)
                    lab[2] = -100
                    kw = dict(temperature=2.0, labels=lab, hard_weight=0.5)
                    x = s.clone().requires_grad_(True)
                    out = kd.kd_loss(x, t, div, reduction="none", backend=name,
                                     **PARAMS.get(div, {}), **kw)
                    out.sum().backward()
                    okw = dict(divergence_name=div, reduction="none", **kw,
                               **{k: v for k, v in PARAMS.get(div, {}).items()})
                    e, eg = oracle.loss_and_grad(s, t, **okw)
                    p, pg = oracle.loss_and_grad(s, t, dtype=torch.float32, **okw)
                    errs = (rel(out.detach(), e), rel(x.grad, eg), rel(p, e), rel(pg, eg))
                    worst = [max(a, b) for a, b in zip(worst, errs)]
            print(f"{name:<10} {str(dtype).replace('torch.', ''):<9} {worst[0]:>9.1e} "
                  f"{worst[1]:>9.1e} {worst[2]:>13.1e} {worst[3]:>13.1e}")


if __name__ == "__main__":
    main()
