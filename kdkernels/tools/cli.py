"""``python -m kdkernels info`` and ``python -m kdkernels check``."""
from __future__ import annotations

import platform
import statistics
import time

import torch

from .. import __version__, backends
from .. import divergences as D


def _versions() -> dict:
    out = {"kdkernels": __version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "not installed"
    out["cuda"] = torch.version.cuda or "none (CPU build)"
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    out["cpu threads"] = str(torch.get_num_threads())
    return out


def run_info(args) -> int:
    for k, v in _versions().items():
        print(f"{k:>12}: {v}")
    print("\nbackends:")
    for name in backends.names():
        reason = backends.availability(name)
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print("\ndivergences:", ", ".join(D.names()))
    return 0


def add_check_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=256, help="rows (tokens), default 256")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size, default 32000")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)


def run_check(args) -> int:
    from ..losses.kd import kd_loss

    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(dev, dtype)
    t = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(dev, dtype)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g).to(dev)
    labels[::7] = -100
    names = [n for n in backends.names()
             if dev.type in backends.BACKENDS[n].devices and backends.availability(n) is None
             and not (n == "triton" and dev.type == "cpu")]
    print(f"check: N={args.rows} V={args.vocab} {args.dtype} on {dev}, T=2, labels with ignored rows")
    print(f"{'divergence':<16} {'backend':<10} {'loss':>12} {'max |dloss|':>12} {'max |dgrad|':>12} "
          f"{'fwd+bwd ms':>11}")
    worst = 0.0
    for div in D.names():
        ref = None
        feature = D.get(div).feature  # e.g. logit_mse: only backends that implement it
        for name in ["reference"] + [n for n in names if n != "reference" and
                                     (feature is None or feature in backends.BACKENDS[n].features)]:
            times = []
            for _ in range(args.repeats):
                x = s.clone().requires_grad_(True)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = kd_loss(x, t, div, temperature=2.0, labels=labels, hard_weight=0.5,
                               backend=name)
                loss.backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            if ref is None:
                ref = (loss.detach(), x.grad)
                dl = dg = 0.0
            else:
                dl = float((loss.detach() - ref[0]).abs())
                dg = float((x.grad.float() - ref[1].float()).abs().max())
                worst = max(worst, dl / max(float(ref[0].abs()), 1e-12))
            print(f"{div:<16} {name:<10} {float(loss.detach()):>12.6f} {dl:>12.3e} {dg:>12.3e} "
                  f"{1e3 * statistics.median(times):>11.2f}")
    print(f"\nworst relative loss difference against the reference: {worst:.2e}")
    return 0
