#!/usr/bin/env bash
# The CPU figures of issue 4: forward-KL forward+backward, fp32, N = 1024, side by side in one
# process (benchmarks/side_by_side.py), V = 32000 (eager, compile, cpu) and V = 128256 (compile,
# cpu), each configuration RUNS times; then peak extra memory in fresh processes.
#   bash benchmarks/cpu_side_by_side.sh OUT_FILE [RUNS]
set -euo pipefail
out=${1:?usage: cpu_side_by_side.sh OUT_FILE [RUNS]}
runs=${2:-3}
py=${PYTHON:-python}
{
  echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) | $(nproc) cores | git $(git rev-parse --short HEAD)"
  echo "# command: bash benchmarks/cpu_side_by_side.sh $out $runs"
  for i in $(seq "$runs"); do
    PYTHONPATH=. "$py" benchmarks/side_by_side.py 1024 32000 15 eager,compile,cpu
    PYTHONPATH=. "$py" benchmarks/side_by_side.py 1024 128256 9 compile,cpu
  done
  for V in 32000 128256; do
    for impl in eager compile cpu; do
      PYTHONPATH=. "$py" benchmarks/peak_memory.py "$impl" 1024 "$V"
    done
  done
} 2>&1 | grep -v -i warn | tee "$out"
