// Argument checks of the CUDA ensemble ops, shared by the real binding (bindings_ensemble_cuda.cpp)
// and its emulated twin (csrc/testing/bindings_ensemble_cuda_emu.cpp). Includes ATen: .cpp only.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "ensemble_cuda.h"
#include "kd_torch_checks.h"

namespace kd {

inline CudaEnsArgs make_ens_args(const at::Tensor& student, at::TensorList teachers,
                                 at::ArrayRef<double> weights, const c10::optional<at::Tensor>& labels,
                                 int64_t div_id, double param, double temperature, double soft_weight,
                                 double hard_weight, int64_t ignore_index, c10::DeviceType device) {
  const int64_t M = (int64_t)teachers.size();
  TORCH_CHECK_VALUE(M >= 1 && M <= kCudaEnsMaxTeachers, "kdkernels (cuda): an ensemble takes 1 to ",
                    kCudaEnsMaxTeachers, " teachers, got ", M);
  TORCH_CHECK_VALUE((int64_t)weights.size() == M, "kdkernels (cuda): ", weights.size(), " weights for ",
                    M, " teachers");
  CudaEnsArgs e;
  e.rows = make_args(student, teachers[0], labels, div_id, param, temperature, soft_weight, hard_weight,
                     ignore_index, device);
  e.t.M = (int)M;
  for (int64_t m = 0; m < M; ++m) {
    // each teacher checked against the student as the single-teacher op checks its own
    make_args(student, teachers[m], labels, div_id, param, temperature, soft_weight, hard_weight,
              ignore_index, device);
    TORCH_CHECK_VALUE(std::isfinite(weights[m]) && weights[m] >= 0.0,
                      "kdkernels (cuda): teacher weights must be finite and >= 0, got ", weights[m]);
    e.t.ptr[m] = teachers[m].data_ptr();
    e.t.L[m] = teachers[m].size(1);
    e.t.stride_b[m] = teachers[m].stride(0);
    e.t.stride_l[m] = teachers[m].stride(1);
    e.t.w[m] = (float)weights[m];
  }
  e.width = cuda_ens_stats_width(M);
  return e;
}

inline at::Tensor check_ens_stats_cuda(const at::Tensor& stats, int64_t N, int64_t width) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == width,
                    "kdkernels (cuda): ensemble stats must have shape [", N, ", ", width, "], got ",
                    stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "kdkernels (cuda): stats must be float32");
  return stats.contiguous();
}

}  // namespace kd
