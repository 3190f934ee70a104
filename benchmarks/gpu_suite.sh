#!/usr/bin/env bash
# The whole GPU job in ONE command of at most 8 minutes: build the CUDA extension, run the tests
# (GPU files first, in parallel), measure the device-to-device copy rate, run the benchmark sweep
# sized to the time left, and leave at most 8 files in one folder:
#
#   env.txt                  card, versions, nvidia-smi, the copy rate, per-step status and times
#   log.txt                  build, test and bench output, bundled
#   junit.xml                the test results (pytest --junitxml)
#   results.csv              the sweep (python -m kdkernels bench CSV)
#   divergences.csv          every divergence at one shape (bench CSV)
#   table.txt                the tables the bench printed (sweep, then divergences)
#   forward_kl_bfloat16.png  sweep plots, one per dtype
#   forward_kl_float32.png
#
# Usage:
#   benchmarks/gpu_suite.sh [OUTDIR]            on the GPU machine (python3, no network)
#   benchmarks/gpu_suite.sh --dry-run OUTDIR    the same logic on a CPU machine: interpreter,
#                                               small shapes, no CUDA build (< 10 min; CI runs
#                                               a fast subset, python_tests/test_gpu_suite.py)
# OUTDIR defaults to $OUT, else benchmarks/results/<card>-<date>.
# Liger joins through a wheel carried from a machine with PyPI, in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl liger-kernel
# and, for the device tool, carry=[".whl"]. It is installed offline (--no-index --no-deps).
#
# Environment: SUITE_SECONDS (total budget, default 480; the tool's limit is 600 per command),
# PYTHON (default python3), GPU_SUITE_TESTS (the pytest selection; default: everything but the
# slow marker), GPU_SUITE_FAST=1 (dry run only: the plumbing with the least work, for CI).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
  [ -n "${1:-}" ] || { echo "usage: $0 --dry-run OUTDIR" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SUITE_SECONDS=${SUITE_SECONDS:-480}
FAST=${GPU_SUITE_FAST:-0}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
left() { echo $(( SUITE_SECONDS - $(elapsed) )); }

if (( DRY )); then
  export TRITON_INTERPRET=1 KDKERNELS_TRITON_BLOCK=${KDKERNELS_TRITON_BLOCK:-64}
  DEVICE=cpu
else
  DEVICE=cuda
fi

card=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
slug=$(echo "$card" | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-+|-+$//g')
OUTDIR=${1:-${OUT:-benchmarks/results/${slug}-$(date -u +%Y-%m-%d)}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/log.txt"
ENV="$OUTDIR/env.txt"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
: > "$LOG"

{
  echo "kdkernels GPU suite$( (( DRY )) && echo ' (DRY RUN: CPU, interpreter, small shapes)')"
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "card: $card"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "command: benchmarks/gpu_suite.sh $( (( DRY )) && echo --dry-run) $*  (SUITE_SECONDS=$SUITE_SECONDS)"
  $PY - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for mod, dist in (("triton", "triton"), ("xdist", "pytest-xdist"), ("liger_kernel", "liger-kernel")):
    try:
        __import__(mod)
        import importlib.metadata as md
        print(dist, md.version(dist))
    except Exception as e:
        print(f"{dist}: not importable ({type(e).__name__})")
EOF
  (( DRY )) || nvidia-smi 2>&1 | head -20
  echo
  echo "steps:"
} > "$ENV"

step() {  # step NAME TIMEOUT CMD...: run CMD with a timeout, output to log.txt, status to env.txt
  local name=$1 limit=$2; shift 2
  (( limit < 5 )) && limit=5
  local s=$(date +%s)
  echo "===== $name (t=$(elapsed)s, limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "  $name: rc=$rc, $(( $(date +%s) - s )) s, limit ${limit} s  [$*]" >> "$ENV"
  echo "===== $name: rc=$rc after $(( $(date +%s) - s )) s" >> "$LOG"
  return $rc
}
skip() { echo "  $1: skipped ($2)" >> "$ENV"; }

# 0. Liger from a carried wheel (offline)
shopt -s nullglob
wheels=("$ROOT"/.whl/liger_kernel-*.whl)
if (( DRY )); then
  skip liger-install "dry run: nothing is installed"
elif (( ${#wheels[@]} )); then
  step liger-install 60 $PY -m pip install -q --no-index --no-deps --no-compile "${wheels[@]}"
else
  skip liger-install "no .whl/liger_kernel-*.whl carried"
fi

# 1. the CUDA extension (continue without it: the Triton and reference backends still run)
if (( DRY )); then
  skip build "dry run: no CUDA build (the CPU extension of the venv is used)"
else
  export KDKERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  step build 200 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
    || step build-inplace 120 $PY setup.py build_ext --inplace
fi

# 2. tests: the GPU files first (they hold the cold Triton compiles), in parallel, one junit XML
GPU_FILES="python_tests/test_triton.py python_tests/test_cuda_backend.py python_tests/test_sparse.py
python_tests/test_fused_linear.py python_tests/test_fuzz.py python_tests/test_regressions.py
python_tests/test_hardening.py python_tests/test_device_guard.py python_tests/test_triton_aot.py"
if [ -n "${GPU_SUITE_TESTS:-}" ]; then
  TESTS=$GPU_SUITE_TESTS
elif (( DRY )); then
  TESTS="python_tests/test_device_guard.py python_tests/test_layout.py"
  (( FAST )) && TESTS="python_tests/test_layout.py"
else
  TESTS="$GPU_FILES python_tests"
fi
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$( (( DRY )) && echo 2 || echo 12)" --dist loadfile)
fi
if (( DRY )); then test_limit=$(( $(left) / 2 )); else test_limit=$(( $(left) - 150 )); fi
(( test_limit > 300 )) && test_limit=300
# shellcheck disable=SC2086
step tests "$test_limit" $PY -m pytest $TESTS -q -rs -m "not slow" -p no:cacheprovider \
  "${XDIST[@]}" --junitxml="$OUTDIR/junit.xml"

# 3. the copy rate (device-to-device on the GPU; memory copy on the CPU)
$PY - >> "$ENV" 2>> "$LOG" <<EOF
import time, torch
dev = "$DEVICE"
n = (1 << 30) if dev == "cuda" else (1 << 26)
a = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1); b = torch.empty_like(a)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
b.copy_(a); sync(); best = 1e9
for _ in range(10 if dev == "cuda" else 3):
    t = time.perf_counter(); b.copy_(a); sync(); best = min(best, time.perf_counter() - t)
print(f"  copy rate ({dev}): {2 * n / best / 1e9:.1f} GB/s (read + write, best of repeats, {n >> 20} MiB)")
EOF

# 3b. the CUDA training step with and without the cluster kernel, side by side, next to the
#     model's predictions (into table.txt); the dry run: the host emulation, tiny, not in FAST
if (( DRY && FAST )); then
  skip cluster-ab "GPU_SUITE_FAST: no CUDA emulation build"
elif (( DRY )); then
  step cluster-ab 240 $PY benchmarks/cuda_cluster_ab.py --N 2 --V 64 --rounds 1 --divergence jsd \
    --out "$TMP/cluster_ab.txt"
else
  step cluster-ab 90 $PY benchmarks/cuda_cluster_ab.py --out "$TMP/cluster_ab.txt"
fi

# 4. the sweep and the divergences, sized to the time left (the bench starts no case after its
#    --time-budget; the hard timeout is 30 s later, for the case in flight)
if (( DRY )); then
  NS="16"; VS="64 300"; IMPLS="eager kd-reference kd-cpu kd-triton"; DIVN=16; DIVV=64
  EXTRA=(--no-memory --repeats 2); (( FAST )) && VS="64"
else
  NS="1024 8192"; VS="32000 128256 262144"; IMPLS="eager compile liger kd-triton kd-cuda"
  DIVN=4096; DIVV=128256; EXTRA=(--repeats 10 --case-seconds 1.5)
fi
budget=$(( $(left) - 30 ))
div_budget=$(( budget / 4 ))
sweep_budget=$(( budget - div_budget - 30 ))
# shellcheck disable=SC2086
step sweep $(( sweep_budget + 30 )) $PY -m kdkernels bench --device "$DEVICE" --quiet \
  --N $NS --V $VS --dtype bfloat16 float32 --impl $IMPLS "${EXTRA[@]}" \
  --time-budget "$sweep_budget" --out "$TMP/sweep"
div_budget=$(( $(left) - 20 ))
# shellcheck disable=SC2086
step divergences $(( div_budget + 15 )) $PY -m kdkernels bench --device "$DEVICE" --quiet \
  --N $DIVN --V $DIVV --dtype bfloat16 --impl $IMPLS "${EXTRA[@]}" --no-plots \
  --divergence forward_kl reverse_kl jsd skew_kl skew_reverse_kl tvd \
  --time-budget $(( div_budget - 15 )) --out "$TMP/div"

# 5. at most 8 files, names of [A-Za-z0-9._-]
[ -f "$TMP/sweep/results.csv" ] && cp "$TMP/sweep/results.csv" "$OUTDIR/results.csv"
[ -f "$TMP/div/results.csv" ] && cp "$TMP/div/results.csv" "$OUTDIR/divergences.csv"
for f in "$TMP"/sweep/*.png; do cp "$f" "$OUTDIR/"; done
{ [ -f "$TMP/sweep/table.txt" ] && { echo "== sweep"; cat "$TMP/sweep/table.txt"; }
  [ -f "$TMP/div/table.txt" ] && { echo; echo "== divergences"; cat "$TMP/div/table.txt"; }
  [ -s "$TMP/cluster_ab.txt" ] && { echo; echo "== cuda: cluster_grad_kernel vs forward_grad_kernel"; cat "$TMP/cluster_ab.txt"; }
} > "$OUTDIR/table.txt"
echo "total: $(elapsed) s" >> "$ENV"
n=$(ls -A "$OUTDIR" | wc -l)
bad=$(ls -A "$OUTDIR" | grep -cv '^[A-Za-z0-9._-]*$')
echo "files ($n): $(ls -A "$OUTDIR" | tr '\n' ' ')" >> "$ENV"
echo "results in $OUTDIR ($n files), $(elapsed) s"
if (( n > 8 || bad > 0 )); then
  echo "too many files or bad names in $OUTDIR" >&2
  exit 3
fi
exit 0
