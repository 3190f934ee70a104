"""Fused linear KD vs the eager path that materializes both logits: peak memory and time.

    python benchmarks/bench_fused_linear.py                      # CPU, N=2048 Ds=256 Dt=512 V=32000 fp32
    python benchmarks/bench_fused_linear.py --device cuda --dtype bfloat16 -N 8192 --ds 2048 \\
        --dt 4096 -V 128256

Implementations (each computes loss, then the gradients w.r.t. student hidden and weight):
  eager  s = h_s @ W_sᵀ, t = h_t @ W_tᵀ (no grad), eager.eager_kd_loss, autograd
  fused  kdkernels.fused_linear_kd_loss (backend "auto", default chunk size)

Peak extra memory: one fresh subprocess per implementation; on CPU the peak RSS (VmHWM) minus
the RSS once the inputs exist, on CUDA torch.cuda.max_memory_allocated minus the inputs.
Time: median (p20, p80) of fwd+bwd, both implementations interleaved in one process.
Rows go to a CSV (implementation, device, dtype, N, V, metric, median, p20, p80, version, card).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import kdkernels as kd  # noqa: E402
from kdkernels import backends  # noqa
from kdkernels.tools import eager  # noqa: E402
from kdkernels.tools.memory_probe import proc_status_kib as rss_kib  # noqa: E402
from kdkernels.losses.fused_linear import auto_chunk_size  # noqa: E402

IMPLS = ("eager", "fused")


def make_inputs(a):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=a.device, dtype=dtype)
    hs = rnd(a.N, a.ds).requires_grad_(True)
    ws = rnd(a.V, a.ds, scale=a.ds ** -0.5 * 2).requires_grad_(True)
    ht = rnd(a.N, a.dt)
    wt = rnd(a.V, a.dt, scale=a.dt ** -0.5 * 2)
    labels = torch.randint(0, a.V, (a.N,), generator=g).to(a.device)
    labels[::7] = -100
    return hs, ws, ht, wt, labels


def step(impl, a, hs, ws, ht, wt, labels):
    """One forward + backward; gradients land in hs.grad, ws.grad (reset first)."""
    hs.grad = ws.grad = None
    if impl == "eager":
        s = hs @ ws.t()
        with torch.no_grad():
            t = ht @ wt.t()
        loss = eager.eager_kd_loss(s, t, a.divergence, temperature=a.temperature,
                                       labels=labels)
    else:
        loss = kd.fused_linear_kd_loss(hs, ws, ht, wt, labels=labels, divergence=a.divergence,
                                       temperature=a.temperature, chunk_size=a.chunk_size)
    loss.backward()
    return loss.detach()


def child(a):
    """Run one implementation once in this fresh process; print its peak extra memory (bytes)."""
    inputs = make_inputs(a)
    if a.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(a.child, a, *inputs)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_kib("VmRSS")
        step(a.child, a, *inputs)
        extra = (rss_kib("VmHWM") - base) * 1024
    print(json.dumps({"impl": a.child, "extra_bytes": extra}))


def measure_memory(a, impl):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl] + a.passthrough
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def measure_time(a):
    inputs = make_inputs(a)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    times = {impl: [] for impl in IMPLS}
    losses = {}
    for impl in IMPLS:  # warm-up (and a check that both compute the same loss)
        losses[impl] = float(step(impl, a, *inputs))
    for _ in range(a.repeats):
        for impl in IMPLS:
            sync()
            t0 = time.perf_counter()
            step(impl, a, *inputs)
            sync()
            times[impl].append(time.perf_counter() - t0)
    return times, losses


def quantiles(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
    return statistics.median(xs), q[0], q[3]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-N", type=int, default=2048)
    p.add_argument("--ds", type=int, default=256)
    p.add_argument("--dt", type=int, default=512)
    p.add_argument("-V", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", default=os.path.join(ROOT, "bench_results", "fused_linear.csv"),
                   help="CSV the rows are appended to (default: the untracked bench_results/; "
                        "pass benchmarks/results/fused_linear.csv to add to the committed record)")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    a.passthrough = ["-N", str(a.N), "--ds", str(a.ds), "--dt", str(a.dt), "-V", str(a.V),
                     "--dtype", a.dtype, "--device", a.device, "--divergence", a.divergence,
                     "--temperature", str(a.temperature)]
    if a.chunk_size:
        a.passthrough += ["--chunk-size", str(a.chunk_size)]
    dev = torch.device(a.device)
    backend = backends.choose("auto", dev, getattr(torch, a.dtype))
    card = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    chunk = a.chunk_size or auto_chunk_size(a.N, a.V, dev)
    print(f"N={a.N} Ds={a.ds} Dt={a.dt} V={a.V} {a.dtype} on {card}; fused backend={backend}, "
          f"chunk={chunk}")
    mem = {impl: measure_memory(a, impl) for impl in IMPLS}
    times, losses = measure_time(a)
    rows = []
    for impl in IMPLS:
        med, p20, p80 = quantiles(times[impl])
        rows.append((impl, a.device, a.dtype, a.N, a.V, "fwd_bwd_seconds", med, p20, p80))
        rows.append((impl, a.device, a.dtype, a.N, a.V, "peak_extra_bytes", mem[impl],
                     mem[impl], mem[impl]))
        print(f"{impl:6s} time median {med:.3f} s (p20 {p20:.3f}, p80 {p80:.3f})  "
              f"peak extra {mem[impl] / 2**20:.0f} MiB  loss {losses[impl]:.6f}")
    print(f"fused/eager: memory {mem['fused'] / mem['eager']:.3f}, "
          f"time {statistics.median(times['fused']) / statistics.median(times['eager']):.3f}")
    os.makedirs(os.path.dirname(a.csv), exist_ok=True)
    new = not os.path.exists(a.csv)
    with open(a.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["implementation", "device", "dtype", "N", "V", "metric", "median", "p20",
                        "p80", "version", "card"])
        for r in rows:
            w.writerow(list(r) + [kd.__version__ + f"+torch{torch.__version__}", card])


if __name__ == "__main__":
    main()
