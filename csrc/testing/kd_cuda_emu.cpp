// csrc/cuda/kd_cuda.cu compiled by the host C++ compiler under the CUDA emulation (cuda_emu.h):
// the same source file, not a copy. Build with -I csrc/testing/include (emulated cuda_runtime.h,
// cuda_bf16.h, cuda_fp16.h) -I csrc/include -fno-strict-aliasing.
#include "cuda_emu.h"

#include "../cuda/kd_cuda.cu"
