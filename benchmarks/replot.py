"""Redraw the PNG plots of a bench CSV: ``python benchmarks/replot.py RESULTS.csv [OUT_DIR]``.

The plots are always drawn from the CSV, so committed results can be re-plotted (for example
after a plotting change) without rerunning anything.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from kdkernels.tools.plotting import plot_csv  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    csv_path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out, exist_ok=True)
    for path in plot_csv(csv_path, out):
        print(path)
