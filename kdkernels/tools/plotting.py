"""PNG plots drawn from a ``python -m kdkernels bench`` CSV (never from in-memory results).

One figure per (divergence, dtype, device, card): time and peak extra memory against V (at the
largest N of the sweep) and against N (at the largest V), one line per implementation.
Implementations that failed or were refused have no time rows in the CSV, so they never appear.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Dict, List

__all__ = ["read_csv", "plot_csv"]

# the same implementation keeps its colour across figures of one run
_ORDER = ["eager", "compile", "liger", "kd-reference", "kd-triton", "kd-cuda", "kd-cpu"]


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows, metric, axis, fixed_key, fixed_value):
    """{impl: sorted [(x, median, p20, p80)]} of ``metric`` against ``axis`` at fixed_key=value."""
    out: Dict[str, list] = defaultdict(list)
    for r in rows:
        if r["metric"] != metric or not r["median"] or int(r[fixed_key]) != fixed_value:
            continue
        med = float(r["median"])
        lo = float(r["p20"]) if r["p20"] else med
        hi = float(r["p80"]) if r["p80"] else med
        out[r["implementation"]].append((int(r[axis]), med, lo, hi))
    return {k: sorted(v) for k, v in out.items()}


def plot_csv(csv_path: str, out_dir: str) -> List[str]:
    """Draw the plots of ``csv_path`` into ``out_dir``; returns the PNG paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = [r for r in read_csv(csv_path) if r["metric"] in ("time_s", "peak_extra_bytes")]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["divergence"], r["dtype"], r["device"], r["card"])].append(r)
    written = []
    for (div, dtype, device, card), grows in sorted(groups.items()):
        impls = sorted({r["implementation"] for r in grows},
                       key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
        extra = [n for n in impls if n not in _ORDER]
        colors = {n: plt.cm.tab10((_ORDER.index(n) if n in _ORDER else len(_ORDER) + extra.index(n))
                                  % 10) for n in impls}
        Ns = sorted({int(r["N"]) for r in grows})
        Vs = sorted({int(r["V"]) for r in grows})
        metrics = [("time_s", "fwd+bwd time (ms)", 1e3)]
        if any(r["metric"] == "peak_extra_bytes" and r["median"] for r in grows):
            metrics.append(("peak_extra_bytes", "peak extra memory (MiB)", 1 / 2**20))
        fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4.2 * len(metrics)), squeeze=False)
        for i, (metric, ylabel, scale) in enumerate(metrics):
            for j, (axis, fixed_key, fixed) in enumerate((("V", "N", Ns[-1]), ("N", "V", Vs[-1]))):
                ax = axes[i][j]
                for name, pts in _series(grows, metric, axis, fixed_key, fixed).items():
                    xs = [p[0] for p in pts]
                    ys = [p[1] * scale for p in pts]
                    yerr = [[y - p[2] * scale for y, p in zip(ys, pts)],
                            [p[3] * scale - y for y, p in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, color=colors[name],
                                label=name)
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel)
                ax.set_yscale("log")
                ticks = sorted({int(r[axis]) for r in grows})
                if len(ticks) > 1:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [str(v) for v in ticks])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_title(f"{ylabel.split(' (')[0]} vs {axis}, {fixed_key} = {fixed}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        date = grows[0]["date"]
        fig.suptitle(f"kdkernels bench: {div}, {dtype}, {device} | {card} | {date}\n"
                     "median of forward+backward (error bars: p20-p80); lower is better", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{div}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
