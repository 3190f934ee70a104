#!/usr/bin/env bash
# The whole GPU job in one command: build the CUDA extension, run the tests (GPU ones included),
# measure the device-to-device copy rate, run the benchmark sweep, and write everything into ONE
# results folder of at most 8 files:
#
#   results.csv              every measurement (python -m kdkernels bench CSV; copy rate included)
#   forward_kl_bfloat16.png  plots drawn from results.csv (one per dtype)
#   forward_kl_float32.png
#   table.txt                the table the bench printed, with card, date, versions, command
#   env.txt                  nvidia-smi, versions, the exact commands, per-step status and times
#   log.txt                  build, test and bench output, bundled
#
# Usage (from anywhere; no internet needed):
#   benchmarks/gpu_suite.sh [OUT_DIR]
# OUT_DIR defaults to $OUT, else benchmarks/results/<card>-<date>. The machine needs torch with
# CUDA, triton, pytest, pytest-benchmark, matplotlib, tqdm (the GPU machine has them). A Liger
# Kernel wheel placed in benchmarks/wheels/ is installed (offline) so Liger joins the comparison.
#
# Time: the suite keeps within SUITE_SECONDS (default 540 s): each step has a timeout, and the
# sweep gets whatever time is left (the bench skips, and reports, the cases it cannot reach).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SUITE_SECONDS=${SUITE_SECONDS:-540}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

card=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
slug=$(echo "$card" | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-+|-+$//g')
OUTDIR=${1:-${OUT:-benchmarks/results/${slug}-$(date -u +%Y-%m-%d)}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
ENV="$OUTDIR/env.txt"
: > "$LOG"

{
  echo "kdkernels GPU suite"
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "card: $card"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "command: benchmarks/gpu_suite.sh $*"
  $PY - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
try:
    import liger_kernel, importlib.metadata as md; print("liger-kernel", md.version("liger-kernel"))
except Exception:
    print("liger-kernel: not installed")
EOF
  nvidia-smi 2>&1 | head -20
  echo
  echo "steps:"
} > "$ENV"

step() {  # step NAME TIMEOUT CMD...: run CMD with a timeout, output to log.txt, status to env.txt
  local name=$1 limit=$2; shift 2
  local s=$(date +%s)
  echo "===== $name (t=$(elapsed)s, limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "  $name: rc=$rc, $(( $(date +%s) - s )) s  [$*]" >> "$ENV"
  echo "===== $name: rc=$rc after $(( $(date +%s) - s )) s" >> "$LOG"
  return $rc
}

# 1. optional offline Liger wheel
shopt -s nullglob
wheels=(benchmarks/wheels/liger_kernel-*.whl)
if (( ${#wheels[@]} )); then
  step liger-install 60 $PY -m pip install --no-index --no-deps "${wheels[@]}"
fi

# 2. build the CUDA extension (continue without it: the Triton and reference backends still run)
export KDKERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
step build 240 \
  $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .

# 3. every test, GPU-marked ones included (the slow marker stays deselected)
step tests 150 $PY -m pytest python_tests -q -rs -m "not slow" -p no:cacheprovider

# 4. the microbenchmarks, briefly (checks each implementation on a small GPU shape)
left=$(( SUITE_SECONDS - $(elapsed) ))
if (( left > 300 )); then
  step microbench 60 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,min,max
fi

# 5. the sweep: copy rate once, then N x V x dtype; budget = what is left, minus a margin
left=$(( SUITE_SECONDS - $(elapsed) - 30 ))
if (( left < 100 )); then left=100; fi
# The bench starts no new case after --time-budget and rewrites results.csv after every shape,
# so the hard timeout (60 s later, for the case in flight) loses at most that case.
step sweep $(( left + 20 )) $PY -m kdkernels bench --device cuda --quiet \
  --N 1024 4096 8192 --V 32000 128256 151936 262144 --dtype bfloat16 float32 \
  --repeats 10 --case-seconds 1.5 --time-budget $(( left - 40 )) \
  --impl eager compile liger kd-triton kd-cuda --out "$OUTDIR"
# kd-reference (the chunked, checkpointed fallback) is the correctness reference of every case;
# it is not timed in the sweep, to leave the time to the implementations that matter.

echo "total: $(elapsed) s" >> "$ENV"
echo "files: $(ls "$OUTDIR" | tr '\n' ' ')" >> "$ENV"
echo "results in $OUTDIR ($(ls "$OUTDIR" | wc -l) files), $(elapsed) s"
