#!/usr/bin/env bash
# A CPU sweep larger than the CLI default (several minutes on 2 cores; eager needs ~2.5 GiB at
# 1024 x 128256 fp32). Usage: benchmarks/cpu_sweep.sh [OUT_DIR] [extra bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-benchmarks/results/cpu-$(date -u +%Y-%m-%d)}
shift || true
exec ${PYTHON:-python} -m kdkernels bench --device cpu --N 256 1024 --V 32000 128256 \
  --dtype float32 bfloat16 --repeats 3 --out "$OUTDIR" "$@"
