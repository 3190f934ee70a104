"""CPU benchmark of the C++ backend: forward-KL forward+backward, fp32, T = 2, 2 threads.

Compares PyTorch eager (kdkernels.tools.eager.eager_kd_loss), torch.compile of the same function
(first call excluded) and kd_loss(..., backend="cpu"). Each (implementation, shape) runs in a fresh
subprocess, so peak RSS is its own: peak extra RSS = VmHWM after the timed calls minus VmRSS before
them (the peak is reset with /proc/self/clear_refs after the warm-up call). Every implementation
allocates its own gradient inside the timed region.

    python benchmarks/bench_cpu_kernel.py                    # N=1024, V in {32000, 128256}
    python benchmarks/bench_cpu_kernel.py --V 32000 --repeats 5 --csv out.csv
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("eager", "compile", "cpu")


def child(impl, N, V, repeats, threads):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kdkernels as kd
    from kdkernels.tools.memory_probe import proc_status_kib
    from kdkernels.tools.eager import eager_kd_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = torch.randn(N, V).requires_grad_(True)
    t = torch.randn(N, V)
    if impl == "eager":
        f = lambda: eager_kd_loss(s, t, temperature=2.0)  # noqa: E731
    elif impl == "compile":
        cf = torch.compile(eager_kd_loss)
        f = lambda: cf(s, t, temperature=2.0)  # noqa: E731
    else:
        f = lambda: kd.kd_loss(s, t, temperature=2.0, backend="cpu")  # noqa: E731

    t0 = time.perf_counter()
    (g,) = torch.autograd.grad(f(), s)
    first = time.perf_counter() - t0
    del g
    base = proc_status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = f()
        (g,) = torch.autograd.grad(loss, s)
        times.append(time.perf_counter() - t0)
        del g, loss
    peak = proc_status_kib("VmHWM") * 1024 - base
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    print(json.dumps(dict(impl=impl, N=N, V=V, threads=threads, first_call_s=first,
                          median_s=statistics.median(times), p20_s=q(0.2), p80_s=q(0.8),
                          peak_extra_rss_bytes=peak, grad_bytes=N * V * 4, repeats=repeats)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args._child[0], args.N, int(args._child[1]), args.repeats, args.threads)
        return
    rows = []
    for V in args.V:
        res = {}
        for impl in args.impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", impl, str(V), "--N",
                   str(args.N), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{impl} V={V} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[impl] = r
            rows.append(r)
            print(f"N={args.N} V={V} {impl:8s} median {r['median_s']:.4f} s  (p20 {r['p20_s']:.4f}, "
                  f"p80 {r['p80_s']:.4f})  first call {r['first_call_s']:.2f} s  peak extra RSS "
                  f"{r['peak_extra_rss_bytes'] / 2**30:.3f} GiB = "
                  f"{r['peak_extra_rss_bytes'] / r['grad_bytes']:.2f} x grad", flush=True)
        if "cpu" in res:
            for other in ("eager", "compile"):
                if other in res:
                    print(f"  V={V}: cpu is {res[other]['median_s'] / res['cpu']['median_s']:.1f}x "
                          f"faster than {other}")
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
