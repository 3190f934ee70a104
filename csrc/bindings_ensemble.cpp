// The kdkernels_C ops of teacher ensembles (csrc/cpu/ensemble_cpu.cpp, kd_ensemble.h) and their
// CPU implementations. Same conventions as bindings.cpp: fake kernels are registered from Python
// (kdkernels/backends/compiled.py), autograd lives in kdkernels/ops/ensemble.py.
//
//   kd_rows_ens_fwd(student, teachers[M], weights[M], labels?, <scalars>) -> (loss [N], stats [N, W])
//   kd_rows_ens_bwd(grad_loss, student, teachers, weights, labels?, stats, <scalars>) -> grad
//   kd_rows_ens_fwd_grad(student, teachers, weights, labels?, <scalars>, grad_scale?) -> (loss, grad)
// with W = 7 + 2 (M - 1) (kd_ensemble.h). Teachers are [B_m, L_m, >= V] views (unit column stride,
// any row strides, columns >= V ignored); weights >= 0 with at least one > 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "kd_ensemble.h"
#include "kd_math.h"
#include "kd_mem.h"
#include "kd_rows.h"
#include "kd_torch_checks.h"

namespace kd {
namespace {

// The argument block and the per-teacher arrays it points into (kept alive by this object).
struct EnsembleCall {
  EnsembleArgs e;
  std::vector<const void*> ptrs;
  std::vector<int64_t> tL, sb, sl;
  std::vector<float> w;

  EnsembleCall(const at::Tensor& student, at::TensorList teachers, at::ArrayRef<double> weights,
               const c10::optional<at::Tensor>& labels, int64_t div_id, double param,
               double temperature, double soft_weight, double hard_weight, int64_t ignore_index) {
    const int64_t M = (int64_t)teachers.size();
    TORCH_CHECK_VALUE(M >= 1, "kdkernels_C: an ensemble needs at least one teacher");
    TORCH_CHECK_VALUE((int64_t)weights.size() == M, "kdkernels_C: ", weights.size(),
                      " weights for ", M, " teachers");
    bool any = false;
    for (int64_t m = 0; m < M; ++m) {
      // each teacher checked against the student as the single-teacher ops check theirs
      make_args(student, teachers[m], labels, div_id, param, temperature, soft_weight,
                hard_weight, ignore_index, at::kCPU);
      TORCH_CHECK_VALUE(weights[m] >= 0.0 && std::isfinite(weights[m]),
                        "kdkernels_C: teacher weights must be finite and >= 0, got ", weights[m]);
      any = any || weights[m] > 0.0;
      ptrs.push_back(teachers[m].data_ptr());
      tL.push_back(teachers[m].size(1));
      sb.push_back(teachers[m].stride(0));
      sl.push_back(teachers[m].stride(1));
      w.push_back((float)weights[m]);
    }
    TORCH_CHECK_VALUE(any, "kdkernels_C: every teacher weight is 0");
    e.rows = make_args(student, teachers[0], labels, div_id, param, temperature, soft_weight,
                       hard_weight, ignore_index, at::kCPU);
    e.M = M;
    e.teachers = ptrs.data();
    e.t_L = tL.data();
    e.t_stride_b = sb.data();
    e.t_stride_l = sl.data();
    e.weights = w.data();
    e.stats_width = ensemble_stats_width(M);
  }
};

void prepare_gradient(const at::Tensor& grad) {
  ::kd::prepare_gradient(grad.data_ptr(), grad.numel() * grad.element_size(),
                         [](int64_t n, const auto& f) { at::parallel_for(0, n, 1, f); });
}

at::Tensor check_ens_stats(const at::Tensor& stats, int64_t N, int64_t width) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == width,
                    "kdkernels_C: ensemble stats must have shape [", N, ", ", width, "], got ",
                    stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "kdkernels_C: stats must be float32");
  return stats.contiguous();
}

// Rows per task: the single-teacher grain divided by the rows read per row (M + 1).
int64_t grain(const EnsembleArgs& e) { return std::max<int64_t>(1, grain_rows(e.rows.V) / (e.M + 1)); }

std::tuple<at::Tensor, at::Tensor> ens_fwd_cpu(const at::Tensor& student, at::TensorList teachers,
                                               at::ArrayRef<double> weights,
                                               const c10::optional<at::Tensor>& labels,
                                               int64_t div_id, double param, double temperature,
                                               double soft_weight, double hard_weight,
                                               int64_t ignore_index) {
  EnsembleCall call(student, teachers, weights, labels, div_id, param, temperature, soft_weight,
                    hard_weight, ignore_index);
  EnsembleArgs& e = call.e;
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({e.rows.N}, f32);
  at::Tensor stats = at::empty({e.rows.N, e.stats_width}, f32);
  e.rows.loss = loss.data_ptr<float>();
  e.rows.stats = stats.data_ptr<float>();
  at::parallel_for(0, e.rows.N, grain(e),
                   [&](int64_t r0, int64_t r1) { cpu_ensemble_forward_rows(e, r0, r1); });
  return {loss, stats};
}

at::Tensor ens_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                       at::TensorList teachers, at::ArrayRef<double> weights,
                       const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                       int64_t div_id, double param, double temperature, double soft_weight,
                       double hard_weight, int64_t ignore_index) {
  EnsembleCall call(student, teachers, weights, labels, div_id, param, temperature, soft_weight,
                    hard_weight, ignore_index);
  EnsembleArgs& e = call.e;
  at::Tensor gl = check_grad_loss(grad_loss, e.rows.N);
  at::Tensor st = check_ens_stats(stats, e.rows.N, e.stats_width);
  at::Tensor grad = at::empty(student.sizes(),
                              student.options().memory_format(at::MemoryFormat::Contiguous));
  e.rows.grad_loss = gl.data_ptr<float>();
  e.rows.stats = const_cast<float*>(st.data_ptr<float>());
  e.rows.grad = grad.data_ptr();
  prepare_gradient(grad);
  at::parallel_for(0, e.rows.N, grain(e),
                   [&](int64_t r0, int64_t r1) { cpu_ensemble_backward_rows(e, r0, r1); });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> ens_fwd_grad_cpu(
    const at::Tensor& student, at::TensorList teachers, at::ArrayRef<double> weights,
    const c10::optional<at::Tensor>& labels, int64_t div_id, double param, double temperature,
    double soft_weight, double hard_weight, int64_t ignore_index,
    const c10::optional<at::Tensor>& grad_scale) {
  EnsembleCall call(student, teachers, weights, labels, div_id, param, temperature, soft_weight,
                    hard_weight, ignore_index);
  EnsembleArgs& e = call.e;
  auto f32 = student.options().dtype(at::kFloat);
  const int64_t N = e.rows.N;
  at::Tensor loss = at::empty({N}, f32);
  at::Tensor stats = at::empty({N, e.stats_width}, f32);
  at::Tensor gl = grad_scale.has_value() ? check_grad_loss(*grad_scale, N) : at::ones({N}, f32);
  at::Tensor grad = at::empty(student.sizes(),
                              student.options().memory_format(at::MemoryFormat::Contiguous));
  e.rows.loss = loss.data_ptr<float>();
  e.rows.stats = stats.data_ptr<float>();
  e.rows.grad_loss = gl.data_ptr<float>();
  e.rows.grad = grad.data_ptr();
  prepare_gradient(grad);
  at::parallel_for(0, N, grain(e),
                   [&](int64_t r0, int64_t r1) { cpu_ensemble_forward_grad_rows(e, r0, r1); });
  return {loss, grad};
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY_FRAGMENT(kdkernels_C, m) {
  m.def("kd_rows_ens_fwd(Tensor student, Tensor[] teachers, float[] weights, Tensor? labels, "
        "int div_id, float param, float temperature, float soft_weight, float hard_weight, "
        "int ignore_index) -> (Tensor, Tensor)");
  m.def("kd_rows_ens_bwd(Tensor grad_loss, Tensor student, Tensor[] teachers, float[] weights, "
        "Tensor? labels, Tensor stats, int div_id, float param, float temperature, "
        "float soft_weight, float hard_weight, int ignore_index) -> Tensor");
  m.def("kd_rows_ens_fwd_grad(Tensor student, Tensor[] teachers, float[] weights, Tensor? labels, "
        "int div_id, float param, float temperature, float soft_weight, float hard_weight, "
        "int ignore_index, Tensor? grad_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdkernels_C, CPU, m) {
  m.impl("kd_rows_ens_fwd", &kd::ens_fwd_cpu);
  m.impl("kd_rows_ens_bwd", &kd::ens_bwd_cpu);
  m.impl("kd_rows_ens_fwd_grad", &kd::ens_fwd_grad_cpu);
}
