"""The CUDA training step with and without the on-chip cluster kernel, side by side in one process,
next to the model's predictions.

kd_cuda.cu reads KDKERNELS_CUDA_CLUSTER_BYTES at every launch: the default budget takes
cluster_grad_kernel (compute capability >= 9.0, the row in shared memory over a cluster), 0 takes
forward_grad_kernel (one CTA a row). For each divergence this times kd_loss forward + backward
(backend="cuda", bf16, labels with the hard term at T = 2: the model's "hard" mode) alternating
the two round by round, and prints the median times, their ratio, the peak memory and the
model's PREDICTED times for the card (benchmarks/results/gpu-model/model.csv, op kd_loss and
kd_loss_1cta at cap 90; H100 or H200 by the card's name, else both).

    python benchmarks/cuda_cluster_ab.py                   # on a GPU: N = 8192, V = 128256
    python benchmarks/cuda_cluster_ab.py --N 4 --V 300     # CPU: the host emulation (plumbing only)

On a CPU the emulation runs the same kernels (KDKERNELS_CUDA_EMULATE=1), far too slowly for its
times to mean anything: they are printed as emulation times, and no model column is compared.
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kdkernels as kd  # noqa: E402
from kdkernels.tools.progress import progress  # noqa: E402

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
MODEL_CSV = os.path.join(ROOT, "benchmarks", "results", "gpu-model", "model.csv")
KERNELS = {"cluster": (None, "kd_loss"), "1cta": ("0", "kd_loss_1cta")}  # env value, model op


def model_ms(path=MODEL_CSV):
    """{(op, div): {"H100": ms, "H200": ms}} of the bf16 sm_90 "hard" TOTAL rows."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (r["impl"], r["cap"], r["dtype"], r["mode"], r["loop"]) == ("cuda", "90", "bf16", "hard", "TOTAL"):
                out[(r["op"], r["div"])] = {c: float(r[f"{c}_ms"]) for c in ("H100", "H200")}
    return out


def cards_for(name):
    return [c for c in ("H100", "H200") if c in name] or ["H100", "H200"]


def set_kernel(kernel):
    value = KERNELS[kernel][0]
    if value is None:
        os.environ.pop("KDKERNELS_CUDA_CLUSTER_BYTES", None)
    else:
        os.environ["KDKERNELS_CUDA_CLUSTER_BYTES"] = value


def time_step(s, t, labels, div, device):
    """Seconds of one kd_loss forward + backward, and the peak memory above the inputs (bytes)."""
    x = s.detach().requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    t0 = time.perf_counter()
    loss = kd.kd_loss(x, t, div, temperature=2.0, labels=labels, hard_weight=0.5, backend="cuda")
    loss.backward()
    if device.type == "cuda":
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3, torch.cuda.max_memory_allocated() - base
    return time.perf_counter() - t0, 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, default=None, help="rows (default 8192 on a GPU, 4 on a CPU)")
    ap.add_argument("--V", type=int, default=None, help="vocabulary (default 128256 on a GPU, 300 on a CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 15 GPU, 2 CPU)")
    ap.add_argument("--divergence", nargs="+", default=DIVS, choices=DIVS)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    lines = []

    def emit(line):
        lines.append(line)
        print(line, flush=True)

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("KDKERNELS_CUDA_EMULATE", "1")
    device = torch.device("cuda" if gpu else "cpu")
    N = (8192 if gpu else 4) if args.N is None else args.N
    V = (128256 if gpu else 300) if args.V is None else args.V
    rounds = (15 if gpu else 2) if args.rounds is None else args.rounds
    for name, v in (("--N", N), ("--V", V), ("--rounds", rounds)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    card = torch.cuda.get_device_name() if gpu else "cpu (CUDA host emulation)"
    model = model_ms() if gpu else {}
    cards = cards_for(card)
    g = torch.Generator(device=device).manual_seed(0)  # on the device: 2 x 1e9 normals on a host take seconds
    s = (torch.randn(N, V, generator=g, device=device) * 2).to(torch.bfloat16)
    t = (torch.randn(N, V, generator=g, device=device) * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    emit(f"card: {card} | torch {torch.__version__} | bf16 N={N} V={V}, labels, hard_weight 0.5, "
         f"T=2, forward+backward, {rounds} alternating rounds (medians)")
    head = ["divergence", "cluster ms", "1cta ms", "1cta / cluster", "cluster peak MiB", "1cta peak MiB"]
    head += [f"model {k} {c} ms" for k in KERNELS for c in cards] if model else []
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    try:
        for div in progress(args.divergence, desc="divergences"):
            times = {k: [] for k in KERNELS}
            peaks = {k: 0 for k in KERNELS}
            for k in KERNELS:  # warm-up: builds, compiles, allocator
                set_kernel(k)
                time_step(s, t, labels, div, device)
            for i in range(rounds):
                order = list(KERNELS) if i % 2 == 0 else list(reversed(list(KERNELS)))
                for k in order:
                    set_kernel(k)
                    sec, peak = time_step(s, t, labels, div, device)
                    times[k].append(sec * 1e3)
                    peaks[k] = max(peaks[k], peak)
            med = {k: statistics.median(v) for k, v in times.items()}
            mib = {k: f"{peaks[k] / 2**20:.0f}" if gpu else "-" for k in KERNELS}
            row = [div, f"{med['cluster']:.3f}", f"{med['1cta']:.3f}", f"{med['1cta'] / med['cluster']:.2f}",
                   mib["cluster"], mib["1cta"]]
            if model:
                for k, (_, op) in KERNELS.items():
                    row += [f"{model[(op, div)][c]:.2f}" if (op, div) in model else "-" for c in cards]
            emit("| " + " | ".join(row) + " |")
    finally:
        set_kernel("cluster")
    if model:
        emit("model columns: PREDICTIONS of benchmarks/gpu_model.py (not measurements)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
