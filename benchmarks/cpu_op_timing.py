"""Time of the C++ CPU fused forward+gradient op alone (no autograd, no Python layer).

    PYTHONPATH=. python benchmarks/cpu_op_timing.py N V [REPEATS]
    KDKERNELS_CPU_POPULATE=0 PYTHONPATH=. python benchmarks/cpu_op_timing.py N V   # pages faulted
                                                                                    # inside the kernel

Forward KL, fp32, T = 2, every row counted; the op allocates its gradient each call (as in
training). Median of REPEATS calls after one warm-up call.
"""
import statistics
import sys
import time

import torch

from kdkernels.backends import compiled as cpp  # noqa: F401  (loads the extension and its ops)

N, V = int(sys.argv[1]), int(sys.argv[2])
R = int(sys.argv[3]) if len(sys.argv) > 3 else 15
torch.manual_seed(0)
s, t = torch.randn(1, N, V), torch.randn(1, N, V)
op = torch.ops.kdkernels_C.kd_rows_fwd_grad


def call():
    return op(s, t, None, 0, 0.0, 2.0, 1.0, 0.0, -100, None)


call()
times = []
for _ in range(R):
    t0 = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - t0)
    del out
print(f"kd_rows_fwd_grad N={N} V={V} fp32 threads={torch.get_num_threads()}: median "
      f"{statistics.median(times) * 1e3:.1f} ms over {R} calls")
