// The CUDA ensemble ops (csrc/cuda/bindings_ensemble_cuda.cpp) over the emulated kernels (tests
// only): ops kd_rows_ens_fwd / kd_rows_ens_bwd added to the kdkernels_cuda_emu library of
// bindings_cuda_emu.cpp, CPU tensors in. The kernels are those of csrc/cuda/ensemble_cuda.cuh,
// compiled with kd_cuda.cu into kd_cuda_emu.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu_host.h"
#include "ensemble_bindings.h"
#include "kd_cuda.h"

namespace kd {
namespace {

void check_ens_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "kdkernels (emulated CUDA): ensemble ", what, " launch failed: ",
              cuda_error_string(code), " (", kd_emu::last_fault(), ")");
}

std::tuple<at::Tensor, at::Tensor> ens_fwd(const at::Tensor& student, at::TensorList teachers,
                                           at::ArrayRef<double> weights, const c10::optional<at::Tensor>& labels,
                                           int64_t div_id, double param, double temperature,
                                           double soft_weight, double hard_weight, int64_t ignore_index) {
  CudaEnsArgs e = make_ens_args(student, teachers, weights, labels, div_id, param, temperature,
                                soft_weight, hard_weight, ignore_index, at::kCPU);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({e.rows.N}, f32);
  at::Tensor stats = at::empty({e.rows.N, e.width}, f32);
  e.rows.loss = loss.data_ptr<float>();
  e.rows.stats = stats.data_ptr<float>();
  check_ens_launch(cuda_forward_rows_ensemble(e, nullptr), "forward");
  return {loss, stats};
}

at::Tensor ens_bwd(const at::Tensor& grad_loss, const at::Tensor& student, at::TensorList teachers,
                   at::ArrayRef<double> weights, const c10::optional<at::Tensor>& labels,
                   const at::Tensor& stats, int64_t div_id, double param, double temperature,
                   double soft_weight, double hard_weight, int64_t ignore_index) {
  CudaEnsArgs e = make_ens_args(student, teachers, weights, labels, div_id, param, temperature,
                                soft_weight, hard_weight, ignore_index, at::kCPU);
  at::Tensor gl = check_grad_loss(grad_loss, e.rows.N);
  at::Tensor st = check_ens_stats_cuda(stats, e.rows.N, e.width);
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  e.rows.grad_loss = gl.data_ptr<float>();
  e.rows.stats = const_cast<float*>(st.data_ptr<float>());
  e.rows.grad = grad.data_ptr();
  check_ens_launch(cuda_backward_rows_ensemble(e, nullptr), "backward");
  return grad;
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY_FRAGMENT(kdkernels_cuda_emu, m) {
  m.def("kd_rows_ens_fwd(Tensor student, Tensor[] teachers, float[] weights, Tensor? labels, int div_id, "
        "float param, float temperature, float soft_weight, float hard_weight, int ignore_index) "
        "-> (Tensor, Tensor)");
  m.def("kd_rows_ens_bwd(Tensor grad_loss, Tensor student, Tensor[] teachers, float[] weights, "
        "Tensor? labels, Tensor stats, int div_id, float param, float temperature, float soft_weight, "
        "float hard_weight, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels_cuda_emu, CPU, m) {
  m.impl("kd_rows_ens_fwd", &kd::ens_fwd);
  m.impl("kd_rows_ens_bwd", &kd::ens_bwd);
}
