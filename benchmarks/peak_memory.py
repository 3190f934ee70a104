"""Peak extra RSS and time of one forward+backward, one implementation per fresh process.

Usage: python benchmarks/peak_memory.py {eager|reference|cpu|...} N V
"""
import resource, sys, time, torch
import kdkernels as kd
from kdkernels.reference import eager_kd_loss
impl, N, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
s = torch.randn(N, V, generator=g); t = torch.randn(N, V, generator=g)
x = s.clone().requires_grad_(True)
# warm the allocator/code paths on a tiny problem so only the big problem's extra memory counts
kd.kd_loss(torch.randn(2, 8, requires_grad=True), torch.randn(2, 8), temperature=2.0, backend=impl if impl != "eager" else "reference").backward()
eager_kd_loss(torch.randn(2, 8, requires_grad=True), torch.randn(2, 8), temperature=2.0).backward()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if impl == "eager":
    loss = eager_kd_loss(x, t, temperature=2.0)
else:
    loss = kd.kd_loss(x, t, temperature=2.0, backend=impl)
loss.backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
grad_mb = x.grad.numel() * x.grad.element_size() / 2**20
print(f"{impl}: N={N} V={V} peak extra RSS {(peak - base) / 1024:.0f} MiB (one fp32 gradient = {grad_mb:.0f} MiB), time {dt:.3f}s, loss {float(loss.detach()):.6f}")
