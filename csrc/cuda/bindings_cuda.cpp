// CUDA implementations of the kdkernels_C ops (schemas in csrc/bindings.cpp, kdkernels._C).
// Torch headers stay here; the kernels (kd_cuda.cu) see only raw pointers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <Python.h>

#include "kd_cuda.h"
#include "kd_math.h"
#include "kd_rows.h"
#include "kd_torch_checks.h"

namespace kd {
namespace {

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "kdkernels_C: CUDA ", what, " launch failed: ", cuda_error_string(code));
}

std::tuple<at::Tensor, at::Tensor> kd_rows_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const c10::optional<at::Tensor>& labels, int64_t div_id,
                                                    double param, double temperature, double soft_weight,
                                                    double hard_weight, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(student.device());
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCUDA);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.N}, f32);
  at::Tensor stats = at::empty({a.N, STATS_WIDTH}, f32);
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  check_launch(cuda_forward_rows(a, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return {loss, stats};
}

at::Tensor kd_rows_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& labels, const at::Tensor& stats, int64_t div_id,
                            double param, double temperature, double soft_weight, double hard_weight,
                            int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(student.device());
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCUDA);
  at::Tensor gl = check_grad_loss(grad_loss, a.N);
  at::Tensor st = check_stats(stats, a.N);
  TORCH_CHECK_VALUE(gl.device() == student.device() && st.device() == student.device(),
                    "kdkernels_C: grad_loss and stats must be on the logits' device");
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  a.grad_loss = gl.data_ptr<float>();
  a.stats = const_cast<float*>(st.data_ptr<float>());
  a.grad = grad.data_ptr();
  check_launch(cuda_backward_rows(a, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  return grad;
}

// Vocab-parallel pass 2 (kd_rows.h RowsArgs::partial): [N, 2] fp32 per-row sums over the
// shard with the normalisers given in stats.
at::Tensor given_stats_cuda(const at::Tensor& student, const at::Tensor& teacher,
                         const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                         int64_t div_id, double param, double temperature, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(student.device());
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, 1.0, 0.0,
                         ignore_index, at::kCUDA);
  at::Tensor st = check_stats(stats, a.N);
  at::Tensor partial = at::empty({a.N, 2}, student.options().dtype(at::kFloat));
  a.stats = const_cast<float*>(st.data_ptr<float>());
  a.partial = partial.data_ptr<float>();
  check_launch(cuda_given_stats_rows(a, c10::cuda::getCurrentCUDAStream().stream()), "given-statistics");
  return partial;
}

// Fused forward and gradient (schema in csrc/bindings.cpp): loss [N] fp32 and
// grad = grad_scale[i] * d loss_i / d student_i, one kernel (forward_grad_kernel).
std::tuple<at::Tensor, at::Tensor> kd_rows_fwd_grad_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                         const c10::optional<at::Tensor>& labels, int64_t div_id,
                                                         double param, double temperature, double soft_weight,
                                                         double hard_weight, int64_t ignore_index,
                                                         const c10::optional<at::Tensor>& grad_scale) {
  c10::cuda::CUDAGuard guard(student.device());
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCUDA);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.N}, f32);
  at::Tensor gl = grad_scale.has_value() ? check_grad_loss(*grad_scale, a.N) : at::ones({a.N}, f32);
  TORCH_CHECK_VALUE(gl.device() == student.device(), "kdkernels_C: grad_scale must be on the logits' device");
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  a.loss = loss.data_ptr<float>();
  a.grad_loss = gl.data_ptr<float>();
  a.grad = grad.data_ptr();
  check_launch(cuda_forward_grad_rows(a, c10::cuda::getCurrentCUDAStream().stream()), "fused forward");
  return {loss, grad};
}

// In place: grad (a [B, L, V] view, unit column stride) rows times grad_loss / grad_scale; rows
// whose ratio is exactly 1 are not touched (no host synchronisation to skip the rescaling).
void kd_rows_rescale_cuda(at::Tensor grad, const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_scale) {
  const RescaleInputs in = check_rescale(grad, grad_loss, grad_scale);
  c10::cuda::CUDAGuard guard(grad.device());
  check_launch(cuda_rescale_rows(grad.data_ptr(), dtype_code(grad.scalar_type()), in.gl.data_ptr<float>(),
                                 in.gs.defined() ? in.gs.data_ptr<float>() : nullptr, in.N, grad.size(2),
                                 grad.size(1), grad.stride(0), grad.stride(1),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "rescale");
}

}  // namespace
}  // namespace kd

// An op of the CUDA library only (no CPU kernel: the CPU backend's scale_rows checks equality
// on the host), so its schema lives here.
TORCH_LIBRARY_FRAGMENT(kdkernels_C, m) {
  m.def("kd_rows_rescale_(Tensor(a!) grad, Tensor grad_loss, Tensor? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(kdkernels_C, CUDA, m) {
  m.impl("kd_rows_rescale_", &kd::kd_rows_rescale_cuda);
  m.impl("kd_rows_fwd", &kd::kd_rows_fwd_cuda);
  m.impl("kd_rows_bwd", &kd::kd_rows_bwd_cuda);
  m.impl("kd_rows_given_stats", &kd::given_stats_cuda);
  m.impl("kd_rows_fwd_grad", &kd::kd_rows_fwd_grad_cuda);
}

static PyModuleDef kd_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                     "kdkernels CUDA ops (CUDA kernels of torch.ops.kdkernels_C)", -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&kd_cuda_module); }
