"""Teacher gradients and teacher ensembles, single process: forward+backward of the kernel backend
against the reference backend and torch.compile of the eager formula (kdkernels.tools.eager),
side by side, with the peak extra memory of each in a fresh process.

    PYTHONPATH=. python benchmarks/features_bench.py [--feature teacher_grad,ensemble]
        [--n 1024] [--v 32000] [--rounds 7] [--divs forward_kl,jsd] [--dtypes float32,bfloat16]
        [--impls cpu,reference,compile] [--m 2]

teacher_grad: one teacher that requires grad (online distillation), gradients to both logits.
ensemble: M teachers (constants), weights 1/M each, gradient to the student. T = 2, every row
counted, "batchmean". Implementations take turns, one step (forward, backward, release) each per
round; medians (and p20-p80) of the rounds after one warm-up step each (torch.compile's
compilation excluded). Peak: extra RSS of one step in a fresh process (benchmarks/peak_memory.py's
method: VmHWM reset through /proc/self/clear_refs, code paths warmed on a tiny problem first), as
a multiple of the gradient buffers the step returns (one per logit tensor that gets a gradient).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy
import torch

import kdkernels as kd
from kdkernels.tools.eager import eager_kd_loss
from kdkernels.tools.memory_probe import proc_status_kib

T = 2.0


def make(feature, n, v, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g).to(dtype)
    if feature == "teacher_grad":
        return s, torch.randn(n, v, generator=g).to(dtype), None
    return s, [torch.randn(n, v, generator=g).to(dtype) for _ in range(m)], [1.0 / m] * m


def step_fn(impl, feature, div, tw):
    tg = feature == "teacher_grad"
    if impl == "compile":
        comp = torch.compile(eager_kd_loss)
        return lambda x, t: comp(x, t, div, temperature=T, teacher_weights=tw, teacher_grad=tg)
    return lambda x, t: kd.kd_loss(x, t, div, temperature=T, teacher_weights=tw, backend=impl)


def leaves(feature, s, t):
    x = s.detach().requires_grad_(True)
    if feature == "teacher_grad":
        return x, t.detach().requires_grad_(True)
    return x, t


def run_step(fn, feature, s, t):
    x, y = leaves(feature, s, t)
    t0 = time.perf_counter()
    loss = fn(x, y)
    loss.backward()
    dt = time.perf_counter() - t0
    val = float(loss.detach())
    del loss, x, y
    return dt, val


def peak_child(args):
    """One impl, one step, in this (fresh) process: prints a JSON line."""
    dtype = getattr(torch, args.dtypes)
    fn = step_fn(args.impls, args.feature, args.divs, [1.0 / args.m] * args.m
                 if args.feature == "ensemble" else None)
    tiny = make(args.feature, 4, 64, args.m, dtype, seed=1)
    run_step(fn, args.feature, *tiny[:2])
    s, t, _ = make(args.feature, args.n, args.v, args.m, dtype)
    if args.impls == "compile":
        run_step(fn, args.feature, s, t)  # compiled on this shape (not measured)
    x, y = leaves(args.feature, s, t)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = proc_status_kib("VmRSS")
    fn(x, y).backward()
    peak = proc_status_kib("VmHWM")
    grads = [z.grad for z in (x, y) if isinstance(z, torch.Tensor) and z.grad is not None]
    grad_mib = sum(g.numel() * g.element_size() for g in grads) / 2**20
    print(json.dumps({"peak_mib": (peak - base) / 1024, "grad_mib": grad_mib}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--feature", default="teacher_grad,ensemble")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--divs", default="forward_kl,jsd")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="cpu,reference,compile")
    ap.add_argument("--no-peak", action="store_true", help="skip the fresh-process peak memory")
    ap.add_argument("--peak-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        return peak_child(args)
    impls = args.impls.split(",")
    print(f"# features_bench N={args.n} V={args.v} M={args.m} T={T} rounds={args.rounds} | torch "
          f"{torch.__version__} threads {torch.get_num_threads()} | kdkernels {kd.__version__}")
    print(f"# {'feature':>12} {'divergence':>10} {'dtype':>8} {'impl':>9} {'median ms':>10} "
          f"{'p20-p80 ms':>15} {impls[1] if len(impls) > 1 else impls[0]:>9}/this "
          f"{'peak MiB':>9} {'x grads':>7} {'loss':>12}")
    for feature in args.feature.split(","):
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            for div in args.divs.split(","):
                s, t, tw = make(feature, args.n, args.v, args.m, dtype)
                fns = {k: step_fn(k, feature, div, tw) for k in impls}
                vals = {k: run_step(fns[k], feature, s, t)[1] for k in impls}  # warm-up
                times = {k: [] for k in impls}
                for _ in range(args.rounds):
                    for k in impls:
                        times[k].append(run_step(fns[k], feature, s, t)[0])
                meds = {k: statistics.median(v) for k, v in times.items()}
                base = meds[impls[1]] if len(impls) > 1 else meds[impls[0]]
                for k in impls:
                    lo, hi = numpy.percentile(times[k], [20, 80])
                    peak = grad = float("nan")
                    if not args.no_peak:
                        out = subprocess.run(
                            [sys.executable, __file__, "--peak-child", "--feature", feature,
                             "--n", str(args.n), "--v", str(args.v), "--m", str(args.m),
                             "--divs", div, "--dtypes", dname, "--impls", k],
                            capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ".")))
                        r = json.loads(out.stdout.strip().splitlines()[-1])
                        peak, grad = r["peak_mib"], r["grad_mib"]
                    print(f"  {feature:>12} {div:>10} {dname:>8} {k:>9} {meds[k] * 1e3:10.1f} "
                          f"{lo * 1e3:7.1f}-{hi * 1e3:<7.1f} {base / meds[k]:12.2f}x "
                          f"{peak:9.1f} {peak / grad:7.2f} {vals[k]:12.6f}", flush=True)


if __name__ == "__main__":
    main()
