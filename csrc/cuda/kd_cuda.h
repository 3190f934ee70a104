// Raw-pointer launchers of the CUDA row kernels (csrc/cuda/kd_cuda.cu). No torch and no CUDA
// headers here: the torch binding (bindings_cuda.cpp) includes this and passes its stream.
#pragma once

#include "kd_rows.h"

namespace kd {

// `stream` is a cudaStream_t. Return 0 on success, else a cudaError_t code.
int cuda_forward_rows(const RowsArgs& args, void* stream);
int cuda_backward_rows(const RowsArgs& args, void* stream);
// The given-statistics pass (kd_rows.h RowsArgs::partial).
int cuda_given_stats_rows(const RowsArgs& args, void* stream);
// Fused forward + gradient: loss, and grad for grad_loss = args.grad_loss (the grad_scale), one kernel.
int cuda_forward_grad_rows(const RowsArgs& args, void* stream);
// In place: rows of grad ([N / L, L, V] at row strides stride_b, stride_l; dtype F32 / BF16 / F16)
// times grad_loss / grad_scale (grad_scale may be null: ones); rows with ratio 1 untouched.
int cuda_rescale_rows(void* grad, int dtype, const float* grad_loss, const float* grad_scale, int64_t N,
                      int64_t V, int64_t L, int64_t stride_b, int64_t stride_l, void* stream);
const char* cuda_error_string(int code);

}  // namespace kd
