"""Memory growth and run-to-run determinism of repeated forward+backward calls.

    PYTHONPATH=. python benchmarks/leak_check.py [CALLS] [backend ...]   # default 1000 reference cpu

jsd, 8 x 512 rows (teacher padded to 520), labels with one ignored row and the hard term. Prints
the resident set before and after CALLS calls (after 20 warm-up calls) and whether two more calls
give bitwise-identical gradients. test_hardening.py asserts the same bounds in CI.
"""
import gc
import os
import sys

import torch

import kdkernels as kd


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


calls = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
names = sys.argv[2:] or ["reference", "cpu"]
torch.manual_seed(0)
s, t = torch.randn(8, 512), torch.randn(8, 520)
lab = torch.randint(0, 512, (8,))
lab[1] = -100
for b in names:
    def step():
        x = s.clone().requires_grad_(True)
        kd.kd_loss(x, t, "jsd", temperature=2.0, labels=lab, hard_weight=0.3, backend=b).backward()
        return x.grad

    for _ in range(20):
        step()
    gc.collect()
    r0 = rss_kib()
    for _ in range(calls):
        step()
    gc.collect()
    r1 = rss_kib()
    g1, g2 = step(), step()
    print(f"{b}: RSS {r0} KiB -> {r1} KiB after {calls} fwd+bwd (growth {r1 - r0} KiB); "
          f"bitwise-identical gradient run to run: {torch.equal(g1, g2)}", flush=True)
