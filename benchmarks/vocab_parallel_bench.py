"""Vocab-parallel kd_loss on CPU: backend="cpu" (the C++ kernels on each rank's shard) against
backend="reference" (the chunked PyTorch path), side by side in one run.

2 gloo ranks (torch.multiprocessing, 127.0.0.1), each holding a V-shard of student and teacher
logits [N, V/2]; one thread per rank. For each divergence and dtype:

* time: forward + backward of one kd_loss call (barrier, then the step; the step's time is the
  slower rank's), in alternating rounds reference, cpu, reference, cpu, ... after one warm-up
  round each; the median over the rounds (and p20, p80);
* peak memory per rank: in a fresh pair of ranks per (implementation, divergence, dtype), the
  high-water mark of the resident set during one step minus the resident set just before it
  (the inputs, and the leaf copy of the student logits, already allocated)
  (VmHWM reset through /proc/self/clear_refs, kdkernels.tools.memory_probe; as
  benchmarks/peak_memory.py), the code paths warmed first on a tiny problem; the max over ranks.

Usage: python benchmarks/vocab_parallel_bench.py [--N 1024] [--V 32000] [--rounds 7]
           [--divs forward_kl,jsd] [--dtypes bfloat16,float32] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

IMPLS = ("reference", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(rank, world, N, V, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g) * 2
    t = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(V, (N,), generator=g)
    labels[::7] = -100
    bounds = torch.arange(V).tensor_split(world)
    o0, o1 = int(bounds[rank][0]), int(bounds[rank][-1]) + 1
    return (s[:, o0:o1].to(dtype).contiguous(), t[:, o0:o1].to(dtype).contiguous(), labels)


def _step(kd, x, t, labels, div, impl):
    """One forward + backward on the leaf ``x`` (a fresh copy of the logits, made before)."""
    loss = kd.kd_loss(x, t, div, temperature=2.0, labels=labels, hard_weight=0.5,
                      process_group=dist.group.WORLD, backend=impl)
    loss.backward()
    return float(loss.detach()), x


def _init(rank, world, port):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))


def _time_worker(rank, world, port, out, N, V, divs, dtypes, rounds):
    import kdkernels as kd
    _init(rank, world, port)
    res = {}
    for dname in dtypes:
        dtype = getattr(torch, dname)
        s, t, labels = _inputs(rank, world, N, V, dtype)
        for div in divs:
            times = {i: [] for i in IMPLS}
            losses = {}
            for r in range(rounds + 1):       # round 0: warm-up, not counted
                for impl in IMPLS:             # alternating: reference, cpu, reference, ...
                    x = s.clone().requires_grad_(True)
                    dist.barrier()
                    t0 = time.perf_counter()
                    loss, _ = _step(kd, x, t, labels, div, impl)
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slower rank's time
                    if r:
                        times[impl].append(float(dt))
                    losses[impl] = loss
            res[(div, dname)] = (times, losses)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


def _mem_worker(rank, world, port, out, N, V, div, dname, impl):
    import kdkernels as kd
    from kdkernels.tools.memory_probe import proc_status_kib
    _init(rank, world, port)
    dtype = getattr(torch, dname)
    ts, tt, tl = _inputs(rank, world, 4, 64, dtype)
    _step(kd, ts.clone().requires_grad_(True), tt, tl, div, impl)  # warm the code paths
    s, t, labels = _inputs(rank, world, N, V, dtype)
    x = s.clone().requires_grad_(True)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS
    base = proc_status_kib("VmRSS")
    _, x = _step(kd, x, t, labels, div, impl)
    extra = torch.tensor([(proc_status_kib("VmHWM") - base) / 1024.0], dtype=torch.float64)
    grad_mib = x.grad.numel() * x.grad.element_size() / 2**20
    dist.all_reduce(extra, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save((float(extra), grad_mib), out)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(fn, world, *args):
    ctx = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world,
                             start_method="spawn")
    del ctx


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception as e:  # pragma: no cover
        return f"({e})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--divs", default="forward_kl,jsd")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--out", default=None, help="folder for vocab_parallel.txt (default: print)")
    a = ap.parse_args()
    world = 2
    divs, dtypes = a.divs.split(","), a.dtypes.split(",")
    tmp = tempfile.mkdtemp(prefix="kd_vp_bench_")

    load_before = _sh("cat /proc/loadavg")
    f = os.path.join(tmp, "times.pt")
    _spawn(_time_worker, world, f, a.N, a.V, divs, dtypes, a.rounds)
    timing = torch.load(f)
    mem = {}
    for dname in dtypes:
        for div in divs:
            for impl in IMPLS:
                f = os.path.join(tmp, f"mem-{impl}-{div}-{dname}.pt")
                _spawn(_mem_worker, world, f, a.N, a.V, div, dname, impl)
                mem[(impl, div, dname)] = torch.load(f)
    load_after = _sh("cat /proc/loadavg")

    import kdkernels
    cpu_model = _sh("lscpu | grep -m1 'Model name' | cut -d: -f2").strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = [
        "Vocab-parallel kd_loss on CPU: backend='cpu' (C++ kernels per shard) vs "
        "backend='reference' (chunked PyTorch)",
        f"command: python {' '.join(sys.argv)}",
        f"git sha: {_sh(f'git -C {root} rev-parse HEAD')}"
        f"{' (dirty tree)' if _sh(f'git -C {root} status --porcelain -uno') else ''}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"kdkernels {getattr(kdkernels, '__version__', '?')}, gcc {_sh('gcc -dumpversion')}",
        f"machine: {cpu_model}, "
        f"{os.cpu_count()} logical CPUs visible",
        f"load average before / after: {load_before} / {load_after}",
        "NOTE: the machine is shared with other agents' jobs (2 cores, loaded while this ran): "
        "absolute times are noisy; implementations alternate round by round so both see the "
        "same load, and the medians over the rounds are reported.",
        f"setup: {world} gloo ranks on 127.0.0.1, 1 thread each; N = {a.N} rows, V = {a.V} split "
        f"{[len(x) for x in torch.arange(a.V).tensor_split(world)]}; T = 2, hard_weight = 0.5, "
        f"every 7th row ignored; forward + backward of one call; time = the slower rank's, "
        f"median (p20-p80) of {a.rounds} alternating rounds after 1 warm-up; peak = extra RSS "
        "of one step in fresh ranks (max over ranks), 'grad' = one [N, V/2] gradient shard.",
        "",
        f"{'divergence':<11} {'dtype':<9} {'impl':<10} {'time ms (p20-p80)':>24} {'speedup':>8} "
        f"{'peak MiB/rank':>14} {'x grad':>7} {'loss':>12}",
    ]
    for dname in dtypes:
        for div in divs:
            times, losses = timing[(div, dname)]
            ref_med = statistics.median(times["reference"])
            for impl in IMPLS:
                ts = times[impl]
                med = statistics.median(ts)
                peak, grad_mib = mem[(impl, div, dname)]
                lines.append(
                    f"{div:<11} {dname:<9} {impl:<10} "
                    f"{med * 1e3:9.1f} ({_pct(ts, 0.2) * 1e3:6.1f}-{_pct(ts, 0.8) * 1e3:6.1f}) "
                    f"{ref_med / med:7.2f}x {peak:14.1f} {peak / grad_mib:7.2f} "
                    f"{losses[impl]:12.6f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "vocab_parallel.txt"), "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
