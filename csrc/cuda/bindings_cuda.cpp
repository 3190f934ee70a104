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

}  // namespace
}  // namespace kd

TORCH_LIBRARY_IMPL(kdkernels_C, CUDA, m) {
  m.impl("kd_rows_fwd", &kd::kd_rows_fwd_cuda);
  m.impl("kd_rows_bwd", &kd::kd_rows_bwd_cuda);
  m.impl("kd_rows_given_stats", &kd::given_stats_cuda);
}

static PyModuleDef kd_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                     "kdkernels CUDA ops (CUDA kernels of torch.ops.kdkernels_C)", -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&kd_cuda_module); }
