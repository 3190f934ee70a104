"""Side by side in one process: forward+backward medians of eager, torch.compile and kdkernels backends.

    PYTHONPATH=. python benchmarks/side_by_side.py N V ROUNDS [impl,impl,...] [divergence] [dtype]
    # impls: eager, compile, cpu, reference; divergence: forward_kl (default), reverse_kl, ...;
    # dtype: float32 (default) or bfloat16 (inputs and gradient in that dtype)
    # an impl may name its own divergence, impl:divergence (cpu:forward_kl,cpu:skew_kl): several
    # divergences then take turns in one process, for ratios between them

Implementations take turns, one step each per round. A step is forward, backward and the release
of what the step made (the loss with its graph, the gradient): each implementation pays for
freeing its own buffers, instead of the next one in the round paying when the last reference
goes (torch.compile keeps [N, V] buffers alive until its loss is dropped; unmapping them takes
~10 ms at N=1024, V=32000 here). The "fwd+bwd" column leaves the release out.
"""
import sys, time, statistics, torch
import kdkernels as kd
from kdkernels.tools.eager import eager_kd_loss
N, V, R = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
impls = sys.argv[4].split(",") if len(sys.argv) > 4 else ["eager", "compile", "cpu"]
div = sys.argv[5] if len(sys.argv) > 5 else "forward_kl"
dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float32
dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
print(f"# N={N} V={V} rounds={R} {dname} {div} T=2 | torch {torch.__version__} threads "
      f"{torch.get_num_threads()} | kdkernels {kd.__version__}", flush=True)
torch.manual_seed(0)
s = torch.randn(N, V).to(dtype); t = torch.randn(N, V).to(dtype)
comp = torch.compile(eager_kd_loss)
makers = {"eager": lambda d: lambda x: eager_kd_loss(x, t, d, temperature=2.0),
          "compile": lambda d: lambda x: comp(x, t, d, temperature=2.0),
          "cpu": lambda d: lambda x: kd.kd_loss(x, t, d, temperature=2.0, backend="cpu"),
          "reference": lambda d: lambda x: kd.kd_loss(x, t, d, temperature=2.0, backend="reference")}
fns = {}
for k in impls:
    name, _, d = k.partition(":")
    if name not in makers:
        raise ValueError(f"impl {k!r}: expected one of {sorted(makers)}, optionally as impl:divergence")
    fns[k] = makers[name](d or div)
times = {k: [] for k in impls}; fw = {k: [] for k in impls}; fb = {k: [] for k in impls}
for k in impls:  # warm-up (compile's first call excluded)
    x = s.detach().requires_grad_(); fns[k](x).backward()
for _ in range(R):
    for k in impls:
        x = s.detach().requires_grad_()
        t0 = time.perf_counter(); l = fns[k](x); t1 = time.perf_counter(); l.backward(); t2 = time.perf_counter()
        del l; x.grad = None; x = None; t3 = time.perf_counter()
        times[k].append(t3 - t0); fb[k].append(t2 - t0); fw[k].append(t1 - t0)
base = statistics.median(times[impls[0]])
for k in impls:
    m = statistics.median(times[k])
    print(f"{k:>{max(9, *map(len, impls))}}: step median {m*1e3:8.1f} ms (fwd+bwd {statistics.median(fb[k])*1e3:7.1f} ms, "
          f"fwd {statistics.median(fw[k])*1e3:7.1f} ms)  {impls[0]}/this = {base/m:5.2f}x")
