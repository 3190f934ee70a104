#!/usr/bin/env bash
# The CPU figures of issues 4 and 20: forward+backward+release, N = 1024, T = 2, side by side in
# one process (benchmarks/side_by_side.py: torch.compile of kdkernels.tools.eager.eager_kd_loss
# against the C++ CPU backend), for every divergence and dtype (fp32, bf16), at V = 32000 and
# V = 128256; then the op alone next to its memory-streaming floor (benchmarks/cpu_op_timing.py),
# and peak extra memory of the cpu backend in fresh processes (benchmarks/peak_memory.py).
#   bash benchmarks/cpu_side_by_side.sh OUT_FILE [ROUNDS_32000] [ROUNDS_128256]
# DIVS / DTYPES / VS (space-separated) narrow the sweep; EAGER=1 adds eager at V = 32000 fp32.
set -euo pipefail
out=${1:?usage: cpu_side_by_side.sh OUT_FILE [ROUNDS_32000] [ROUNDS_128256]}
r32=${2:-7}
r128=${3:-3}
py=${PYTHON:-python}
divs=${DIVS:-forward_kl reverse_kl jsd skew_kl skew_reverse_kl tvd}
dtypes=${DTYPES:-float32 bfloat16}
vs=${VS:-32000 128256}
{
  echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) | $(nproc) cores | git $(git rev-parse --short HEAD)"
  echo "# command: DIVS='$divs' DTYPES='$dtypes' VS='$vs' bash benchmarks/cpu_side_by_side.sh $out $r32 $r128"
  echo "# versions: $("$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)') $(g++ --version | head -1)"
  for V in $vs; do
    rounds=$([ "$V" -le 32000 ] && echo "$r32" || echo "$r128")
    for dt in $dtypes; do
      for div in $divs; do
        impls=compile,cpu
        if [ "${EAGER:-0}" = 1 ] && [ "$V" -le 32000 ] && [ "$dt" = float32 ]; then impls=eager,compile,cpu; fi
        PYTHONPATH=. "$py" benchmarks/side_by_side.py 1024 "$V" "$rounds" "$impls" "$div" "$dt"
      done
    done
  done
  for V in $vs; do
    PYTHONPATH=. "$py" benchmarks/cpu_op_timing.py 1024 "$V" 7 "$(echo $divs | tr ' ' ,)" "$(echo $dtypes | tr ' ' ,)"
  done
  for V in $vs; do
    for dt in $dtypes; do
      for div in $divs; do
        PYTHONPATH=. "$py" benchmarks/peak_memory.py cpu 1024 "$V" "$div" "$dt"
      done
    done
  done
} 2>&1 | grep -v -i warn | tee "$out"
