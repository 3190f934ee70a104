#!/bin/sh
# ThreadSanitizer run of the emulated CUDA kernels (docs/cuda_emulation.md): builds the standalone
# harness (emu_harness.cpp: csrc/cuda/kd_cuda.cu under cuda_emu.h, checked against the C++ CPU
# kernels) with -fsanitize=thread and runs it with every CUDA thread an OS thread.
# Usage: csrc/testing/run_tsan.sh [quick|full] [output binary]
set -e
here=$(cd "$(dirname "$0")" && pwd)
out=${2:-/tmp/kd_emu_harness_tsan}
CXX=${CXX:-g++}
$CXX -std=c++17 -O1 -g -fsanitize=thread -fno-strict-aliasing -pthread \
  -I"$here/include" -I"$here" -I"$here/../include" -I"$here/../cuda" \
  "$here/emu_harness.cpp" "$here/kd_cuda_emu.cpp" "$here/cuda_emu.cpp" "$here/../cpu/kd_cpu.cpp" \
  "$here/../cpu/mse_cpu.cpp" \
  -o "$out"
KDKERNELS_CUDA_EMULATE_MODE=threads TSAN_OPTIONS="halt_on_error=0 exitcode=66 ${TSAN_OPTIONS:-}" \
  "$out" "${1:-quick}"
