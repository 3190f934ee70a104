"""Peak extra RSS and time of one forward+backward, one implementation per fresh process.

Usage: python benchmarks/peak_memory.py {eager|compile|reference|cpu|...} N V [divergence] [dtype]

"Extra" is the high-water mark of the resident set during the step minus the resident set just
before it (inputs already allocated; VmHWM is reset through /proc/self/clear_refs first). The
code paths are warmed first on a tiny problem; torch.compile is also compiled and run once on
the measured shape, so its compilation memory does not count.
"""
import sys, time, torch
import kdkernels as kd
from kdkernels.tools.memory_probe import proc_status_kib
from kdkernels.tools.eager import eager_kd_loss


impl, N, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
div = sys.argv[4] if len(sys.argv) > 4 else "forward_kl"
dtype = getattr(torch, sys.argv[5]) if len(sys.argv) > 5 else torch.float32
g = torch.Generator().manual_seed(0)
s = torch.randn(N, V, generator=g).to(dtype); t = torch.randn(N, V, generator=g).to(dtype)
if impl == "eager":
    fn = lambda x: eager_kd_loss(x, t, div, temperature=2.0)  # noqa: E731
elif impl == "compile":
    comp = torch.compile(eager_kd_loss)
    fn = lambda x: comp(x, t, div, temperature=2.0)  # noqa: E731
    fn(s.clone().requires_grad_(True)).backward()  # compile on this shape (not measured)
else:
    fn = lambda x: kd.kd_loss(x, t, div, temperature=2.0, backend=impl)  # noqa: E731
kd.kd_loss(torch.randn(2, 8, requires_grad=True).to(dtype), torch.randn(2, 8).to(dtype), div,
           temperature=2.0, backend=impl if impl not in ("eager", "compile") else "reference").backward()
eager_kd_loss(torch.randn(2, 8, requires_grad=True), torch.randn(2, 8), div, temperature=2.0).backward()
x = s.clone().requires_grad_(True)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM := current RSS
base = proc_status_kib("VmRSS")
t0 = time.perf_counter()
loss = fn(x)
loss.backward()
dt = time.perf_counter() - t0
peak = proc_status_kib("VmHWM")
grad_mb = x.grad.numel() * x.grad.element_size() / 2**20
print(f"{impl}: {div} {dtype} N={N} V={V} peak extra RSS {(peak - base) / 1024:.0f} MiB (one gradient = "
      f"{grad_mb:.0f} MiB, ratio {(peak - base) / 1024 / grad_mb:.2f}), time {dt:.3f}s, "
      f"loss {float(loss.detach()):.6f}")
