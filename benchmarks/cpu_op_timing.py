"""Time of the C++ CPU fused forward+gradient op alone (no autograd, no Python layer), next to the
memory-streaming floor measured in the same run.

    PYTHONPATH=. python benchmarks/cpu_op_timing.py N V [REPEATS] [div,div,...] [dtype,dtype,...]
    KDKERNELS_CPU_POPULATE=0 PYTHONPATH=. python benchmarks/cpu_op_timing.py N V   # pages faulted
                                                                                    # inside the kernel

T = 2, every row counted; the op allocates its gradient each call (as in training). Median of
REPEATS calls after one warm-up call, the divergences taking turns. Defaults: forward_kl, float32.

Floor per call: the bytes the fused op must move (student and teacher read once, the gradient
written once: 3 x element size per element) divided by the copy bandwidth measured here
(torch copy_ of a [N, V] buffer into a warm one: read + write bytes / time), plus the measured
cost of faulting in one fresh gradient buffer (torch.empty + fill_ minus fill_ of a warm buffer,
with transparent huge pages, as the kernel advises them).
"""
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # fresh buffers on huge pages, as the kernel's

import torch  # noqa: E402

from kdkernels import divergences  # noqa: E402
from kdkernels.backends import compiled as cpp  # noqa: E402,F401  (loads the extension and its ops)

N, V = int(sys.argv[1]), int(sys.argv[2])
R = int(sys.argv[3]) if len(sys.argv) > 3 else 15
divs = sys.argv[4].split(",") if len(sys.argv) > 4 else ["forward_kl"]
dtypes = [getattr(torch, d) for d in sys.argv[5].split(",")] if len(sys.argv) > 5 else [torch.float32]
op = torch.ops.kdkernels_C.kd_rows_fwd_grad


def med(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
        del out
    return statistics.median(ts)


print(f"# cpu_op_timing N={N} V={V} repeats={R} threads={torch.get_num_threads()} torch "
      f"{torch.__version__}", flush=True)
for dtype in dtypes:
    torch.manual_seed(0)
    s, t = torch.randn(1, N, V).to(dtype), torch.randn(1, N, V).to(dtype)
    es = s.element_size()
    # copy bandwidth and fresh-buffer cost, in this run
    src, dst = torch.randn(N, V).to(dtype), torch.empty(N, V, dtype=dtype)
    dst.copy_(src)
    t_copy = med(lambda: dst.copy_(src), R)
    bw = 2 * N * V * es / t_copy
    t_fill = med(lambda: dst.fill_(0), R)
    t_fresh = med(lambda: torch.empty(N, V, dtype=dtype).fill_(0), R)
    fault = max(t_fresh - t_fill, 0.0)
    floor = 3 * N * V * es / bw + fault
    print(f"{str(dtype)[6:]}: copy {bw / 1e9:.1f} GB/s, fresh gradient buffer {fault * 1e3:.1f} ms "
          f"({N * V * es / 2**20:.0f} MiB); floor = {3 * es} B/elem / copy + fresh buffer = "
          f"{floor * 1e3:.1f} ms", flush=True)
    times = {d: [] for d in divs}
    args = {}
    for d in divs:
        spec = divergences.get(d)
        args[d] = (s, t, None, spec.id, spec.check_param(None), 2.0, 1.0, 0.0, -100, None)
        op(*args[d])
    for _ in range(R):
        for d in divs:
            t0 = time.perf_counter()
            out = op(*args[d])
            times[d].append(time.perf_counter() - t0)
            del out
    for d in divs:
        m = statistics.median(times[d])
        print(f"  kd_rows_fwd_grad {d:>15} {str(dtype)[6:]:>8}: median {m * 1e3:7.1f} ms over {R} "
              f"calls, floor {floor * 1e3:6.1f} ms, op/floor {m / floor:4.2f}", flush=True)
