// Argument checks and RowsArgs construction shared by the CPU and CUDA torch bindings (.cpp only:
// this header includes ATen, so it must never be included from a .cu file).
#pragma once

#include <ATen/ATen.h>

#include "kd_math.h"
#include "kd_rows.h"

namespace kd {

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default:
      TORCH_CHECK_TYPE(false, "kdkernels_C: student/teacher dtype must be float32, bfloat16 or "
                              "float16, got ", t);
  }
  return F32;
}

inline RowsArgs make_args(const at::Tensor& student, const at::Tensor& teacher,
                          const c10::optional<at::Tensor>& labels, int64_t div_id, double param,
                          double temperature, double soft_weight, double hard_weight,
                          int64_t ignore_index, c10::DeviceType device) {
  TORCH_CHECK_VALUE(student.dim() == 3, "kdkernels_C: student must be a [B, L, V] view, got shape ",
                    student.sizes());
  TORCH_CHECK_VALUE(teacher.dim() == 3, "kdkernels_C: teacher must be a [B, L, Vt] view, got shape ",
                    teacher.sizes());
  TORCH_CHECK_VALUE(student.device().type() == device && teacher.device() == student.device(),
                    "kdkernels_C: student and teacher must be on the same ", c10::DeviceTypeName(device),
                    " device, got ", student.device(), " and ", teacher.device());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "kdkernels_C: teacher dtype ",
                   teacher.scalar_type(), " differs from student dtype ", student.scalar_type());
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  TORCH_CHECK_VALUE(V >= 1, "kdkernels_C: student vocabulary V must be >= 1");
  TORCH_CHECK_VALUE(teacher.size(0) * teacher.size(1) == B * L && teacher.size(2) >= V,
                    "kdkernels_C: teacher shape ", teacher.sizes(), " must be [B', L', >= ", V,
                    "] with B' * L' = ", B * L, " rows like the student ", student.sizes());
  TORCH_CHECK_VALUE(student.stride(2) == 1 || V == 1, "kdkernels_C: student must have unit column stride");
  TORCH_CHECK_VALUE(teacher.stride(2) == 1 || teacher.size(2) == 1,
                    "kdkernels_C: teacher must have unit column stride");
  TORCH_CHECK_VALUE(div_id >= 0 && div_id < NUM_DIVERGENCES, "kdkernels_C: div_id must lie in [0, ",
                    int(NUM_DIVERGENCES), "), got ", div_id);
  TORCH_CHECK_VALUE(temperature > 0, "kdkernels_C: temperature must be > 0, got ", temperature);
  RowsArgs a;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.N = B * L;
  a.L = L;
  a.t_L = teacher.size(1);
  a.V = V;
  a.s_stride_b = student.stride(0);
  a.s_stride_l = student.stride(1);
  a.t_stride_b = teacher.stride(0);
  a.t_stride_l = teacher.stride(1);
  a.dtype = dtype_code(student.scalar_type());
  a.div = (int)div_id;
  a.param = (float)param;
  a.temperature = (float)temperature;
  a.soft_weight = (float)soft_weight;
  a.hard_weight = (float)hard_weight;
  a.ignore_index = ignore_index;
  if (labels.has_value()) {
    const at::Tensor& lab = *labels;
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, "kdkernels_C: labels must be int64, got ",
                     lab.scalar_type());
    TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == a.N && lab.is_contiguous(),
                      "kdkernels_C: labels must be a contiguous [N] tensor with N = ", a.N,
                      ", got shape ", lab.sizes());
    TORCH_CHECK_VALUE(lab.device() == student.device(), "kdkernels_C: labels are on ", lab.device(),
                      " but the logits are on ", student.device());
    a.labels = lab.data_ptr<int64_t>();
  }
  return a;
}

inline at::Tensor check_grad_loss(const at::Tensor& grad_loss, int64_t N) {
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == N,
                    "kdkernels_C: grad_loss must have shape [", N, "], got ", grad_loss.sizes());
  return grad_loss.to(at::kFloat).contiguous();
}

inline at::Tensor check_stats(const at::Tensor& stats, int64_t N) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == STATS_WIDTH,
                    "kdkernels_C: stats must have shape [", N, ", ", int(STATS_WIDTH), "], got ",
                    stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "kdkernels_C: stats must be float32");
  return stats.contiguous();
}

// The checked [N] fp32 factors of kd_rows_rescale_ (CUDA binding and its emulation): grad a
// [B, L, V] view with unit column stride, grad_loss and grad_scale (optional) N = B * L values on
// its device.
struct RescaleInputs {
  at::Tensor gl, gs;  // gs undefined: ones
  int64_t N;
};

inline RescaleInputs check_rescale(const at::Tensor& grad, const at::Tensor& grad_loss,
                                   const c10::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK_VALUE(grad.dim() == 3 && (grad.size(2) <= 1 || grad.stride(2) == 1),
                    "kdkernels: grad must be a [B, L, V] tensor with unit column stride");
  RescaleInputs in;
  in.N = grad.size(0) * grad.size(1);
  in.gl = check_grad_loss(grad_loss.reshape({-1}), in.N);
  if (grad_scale.has_value()) in.gs = check_grad_loss(grad_scale->reshape({-1}), in.N);
  TORCH_CHECK_VALUE(in.gl.device() == grad.device() && (!in.gs.defined() || in.gs.device() == grad.device()),
                    "kdkernels: grad_loss and grad_scale must be on the gradient's device");
  return in;
}

}  // namespace kd
