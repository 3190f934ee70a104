"""Teacher ensembles on CPU, side by side in one process: forward+backward medians and peak memory of
the C++ CPU kernels (backend="cpu", csrc/cpu/ensemble_cpu.cpp), the reference backend, and
torch.compile of the eager formula (p = Σ_m w_m softmax(t_m / T) on the full [N, V] tensors,
plain autograd: kdkernels.backends.reference.row_losses on the whole batch, as
kdkernels.tools.eager.eager_kd_loss does for one teacher).

    PYTHONPATH=. python benchmarks/ensemble_bench.py [N] [V] [ROUNDS] [M] [impl,...] [div,...] [dtype,...]
    # defaults: N = 1024, V = 32000, 7 rounds, M = 2 teachers (weights 0.3, 0.7, ... normalised),
    # impls cpu,reference,compile, divergences forward_kl,jsd, dtypes float32,bfloat16; T = 2

Implementations take turns, one step each per round (a step: forward, backward, and the release
of the loss and the gradient, as benchmarks/side_by_side.py). Peak memory: one more step per
implementation after the rounds, the high-water mark of the resident set during it (VmHWM reset
through /proc/self/clear_refs) minus the resident set before it, as a multiple of one gradient
buffer (N·V elements of the dtype); the inputs are allocated before and do not count.
"""
import statistics
import sys
import time

import torch

import kdkernels as kd
from kdkernels import divergences as D
from kdkernels.backends import reference
from kdkernels.tools.memory_probe import proc_status_kib

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
V = int(sys.argv[2]) if len(sys.argv) > 2 else 32000
R = int(sys.argv[3]) if len(sys.argv) > 3 else 7
M = int(sys.argv[4]) if len(sys.argv) > 4 else 2
impls = sys.argv[5].split(",") if len(sys.argv) > 5 else ["cpu", "reference", "compile"]
divs = sys.argv[6].split(",") if len(sys.argv) > 6 else ["forward_kl", "jsd"]
dtypes = [getattr(torch, d) for d in sys.argv[7].split(",")] if len(sys.argv) > 7 \
    else [torch.float32, torch.bfloat16]
T = 2.0
raw = [0.3 + 0.4 * m for m in range(M)]
WEIGHTS = [w / sum(raw) for w in raw]


def eager_ensemble_kd_loss(student, teachers, weights, divergence, temperature):
    """What a user writes without this library: the formula on the full [N, V] tensors."""
    div = D.get(divergence)
    rows = reference.row_losses(student, [t.detach() for t in teachers], None, div.id,
                                D.resolve_param(div, None, None), temperature, 1.0, 0.0, -100,
                                teacher_weights=weights)
    return rows.sum() / rows.numel()


compiled = torch.compile(eager_ensemble_kd_loss)


def make(impl, ts, div):
    if impl == "compile":
        return lambda x: compiled(x, ts, WEIGHTS, div, T)
    if impl == "eager":
        return lambda x: eager_ensemble_kd_loss(x, ts, WEIGHTS, div, T)
    return lambda x: kd.kd_loss(x, ts, div, temperature=T, teacher_weights=WEIGHTS, backend=impl)


def peak_extra_mib(fn, s):
    x = s.detach().clone().requires_grad_(True)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS
    base = proc_status_kib("VmRSS")
    loss = fn(x)
    loss.backward()
    peak = proc_status_kib("VmHWM")
    del loss
    x.grad = None
    return (peak - base) / 1024


print(f"# ensemble_bench N={N} V={V} M={M} weights={[round(w, 3) for w in WEIGHTS]} T={T} "
      f"rounds={R} | torch {torch.__version__} threads {torch.get_num_threads()} | "
      f"kdkernels {kd.__version__}", flush=True)
for dtype in dtypes:
    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    torch.manual_seed(0)
    s = torch.randn(N, V).to(dtype)
    ts = [torch.randn(N, V).to(dtype) for _ in range(M)]
    grad_mib = N * V * s.element_size() / 2**20
    for div in divs:
        fns = {k: make(k, ts, div) for k in impls}
        times = {k: [] for k in impls}
        fb = {k: [] for k in impls}
        for k in impls:  # warm-up (compile's first call excluded)
            x = s.detach().requires_grad_()
            fns[k](x).backward()
            x.grad = None
        for _ in range(R):
            for k in impls:
                x = s.detach().requires_grad_()
                t0 = time.perf_counter()
                loss = fns[k](x)
                loss.backward()
                t1 = time.perf_counter()
                del loss
                x.grad = None
                x = None
                t2 = time.perf_counter()
                times[k].append(t2 - t0)
                fb[k].append(t1 - t0)
        base = statistics.median(times[impls[0]])
        for k in impls:
            m = statistics.median(times[k])
            peak = peak_extra_mib(fns[k], s)
            print(f"{dname} {div:>10} {k:>9}: step median {m * 1e3:8.1f} ms (fwd+bwd "
                  f"{statistics.median(fb[k]) * 1e3:7.1f} ms)  {impls[0]}/this = {base / m:5.2f}x"
                  f"  peak extra {peak:8.1f} MiB = {peak / grad_mib:5.2f} x gradient "
                  f"({grad_mib:.0f} MiB)", flush=True)
