// Teacher ensembles in the CUDA backend: the argument block and the raw-pointer launchers of the
// ensemble row kernels (csrc/cuda/ensemble_cuda.cuh, compiled as part of kd_cuda.cu's translation
// unit so that it shares that file's load / store / block-reduction helpers). Target
// p = sum_m w_m softmax(t_m / T). No torch and no CUDA headers (bindings_ensemble_cuda.cpp and its
// emulated twin csrc/testing/bindings_ensemble_cuda_emu.cpp include this).
//
// Stats [N, 7 + 2 (M - 1)] fp32: columns 0..6 as the single-teacher CUDA forward stores them (raw
// maxima: teacher 0's (max of t_0, log sum-exp of (t_0 - max) / T) in 0..1, the student's in 2..3,
// c = sum q g in 4 (-1 for forward KL), the hard term's (max, lse) of s in 5..6), then teacher m's
// (max, lse) in 7 + 2 (m - 1), 8 + 2 (m - 1). Ignored rows: all 0.
#pragma once

#include <stdint.h>

#include "kd_math.h"
#include "kd_rows.h"

namespace kd {

// Teachers per call (kernel parameter space holds them by value).
constexpr int kCudaEnsMaxTeachers = 16;

struct CudaEnsTeachers {
  int M = 0;
  const void* ptr[kCudaEnsMaxTeachers] = {};
  int64_t L[kCudaEnsMaxTeachers] = {};         // each teacher's own row split (B_m * L_m = N)
  int64_t stride_b[kCudaEnsMaxTeachers] = {};
  int64_t stride_l[kCudaEnsMaxTeachers] = {};
  float w[kCudaEnsMaxTeachers] = {};            // weights, > 0, summing to 1
};

struct CudaEnsArgs {
  RowsArgs rows;  // student, labels, scalars, outputs (rows.teacher unused; stats has `width` columns)
  CudaEnsTeachers t;
  int64_t width = STATS_WIDTH;
};

inline int64_t cuda_ens_stats_width(int64_t M) { return STATS_WIDTH + 2 * (M - 1); }

// `stream` is a cudaStream_t. Return 0 on success, else a cudaError_t code.
int cuda_forward_rows_ensemble(const CudaEnsArgs& args, void* stream);
int cuda_backward_rows_ensemble(const CudaEnsArgs& args, void* stream);

}  // namespace kd
