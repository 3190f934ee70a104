// Torch ops of the CUDA ensemble kernels (ensemble_cuda.h), namespace kdkernels_cuda_ens (its own
// library: the ops need no schema in kdkernels_C). kdkernels/backends/compiled.py calls them.
//   kd_rows_ens_fwd(student, teachers[M], weights[M], labels?, <scalars>) -> (loss [N], stats [N, W])
//   kd_rows_ens_bwd(grad_loss, student, teachers, weights, labels?, stats, <scalars>) -> grad
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ensemble_bindings.h"
#include "kd_cuda.h"

namespace kd {
namespace {

void check_ens_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "kdkernels (cuda): ensemble ", what, " launch failed: ", cuda_error_string(code));
}

std::tuple<at::Tensor, at::Tensor> ens_fwd_cuda(const at::Tensor& student, at::TensorList teachers,
                                                at::ArrayRef<double> weights,
                                                const c10::optional<at::Tensor>& labels, int64_t div_id,
                                                double param, double temperature, double soft_weight,
                                                double hard_weight, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(student.device());
  CudaEnsArgs e = make_ens_args(student, teachers, weights, labels, div_id, param, temperature,
                                soft_weight, hard_weight, ignore_index, at::kCUDA);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({e.rows.N}, f32);
  at::Tensor stats = at::empty({e.rows.N, e.width}, f32);
  e.rows.loss = loss.data_ptr<float>();
  e.rows.stats = stats.data_ptr<float>();
  check_ens_launch(cuda_forward_rows_ensemble(e, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return {loss, stats};
}

at::Tensor ens_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student, at::TensorList teachers,
                        at::ArrayRef<double> weights, const c10::optional<at::Tensor>& labels,
                        const at::Tensor& stats, int64_t div_id, double param, double temperature,
                        double soft_weight, double hard_weight, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(student.device());
  CudaEnsArgs e = make_ens_args(student, teachers, weights, labels, div_id, param, temperature,
                                soft_weight, hard_weight, ignore_index, at::kCUDA);
  at::Tensor gl = check_grad_loss(grad_loss, e.rows.N);
  at::Tensor st = check_ens_stats_cuda(stats, e.rows.N, e.width);
  TORCH_CHECK_VALUE(gl.device() == student.device() && st.device() == student.device(),
                    "kdkernels (cuda): grad_loss and stats must be on the logits' device");
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  e.rows.grad_loss = gl.data_ptr<float>();
  e.rows.stats = const_cast<float*>(st.data_ptr<float>());
  e.rows.grad = grad.data_ptr();
  check_ens_launch(cuda_backward_rows_ensemble(e, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  return grad;
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY(kdkernels_cuda_ens, m) {
  m.def("kd_rows_ens_fwd(Tensor student, Tensor[] teachers, float[] weights, Tensor? labels, int div_id, "
        "float param, float temperature, float soft_weight, float hard_weight, int ignore_index) "
        "-> (Tensor, Tensor)");
  m.def("kd_rows_ens_bwd(Tensor grad_loss, Tensor student, Tensor[] teachers, float[] weights, "
        "Tensor? labels, Tensor stats, int div_id, float param, float temperature, float soft_weight, "
        "float hard_weight, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels_cuda_ens, CUDA, m) {
  m.impl("kd_rows_ens_fwd", &kd::ens_fwd_cuda);
  m.impl("kd_rows_ens_bwd", &kd::ens_bwd_cuda);
}
