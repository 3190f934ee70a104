// Host emulation (csrc/testing/cuda_emu.h) in place of the CUDA toolkit header <cuda_bf16.h>.
#pragma once
#include "../cuda_emu.h"
