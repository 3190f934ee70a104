// TORCH_LIBRARY registration of the kdkernels_C ops and their CPU implementations.
//
// The namespace is kdkernels_C (the Python custom ops own "kdkernels"). Fake kernels are
// registered from Python (kdkernels/backends/compiled.py); autograd lives in kdkernels/ops/dense.py, which calls these
// ops through the backend contract. The CUDA implementations are registered by the separate
// kdkernels._C_cuda extension (csrc/cuda/bindings_cuda.cpp) for the same schemas.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <Python.h>

#include <string>
#include <vector>

#include "kd_math.h"
#include "kd_mem.h"
#include "kd_rows.h"
#include "kd_torch_checks.h"

namespace kd {
namespace {

// A fresh gradient buffer (kd_mem.h): huge pages advised, pages faulted in by all threads.
void prepare_gradient(const at::Tensor& grad) {
  ::kd::prepare_gradient(grad.data_ptr(), grad.numel() * grad.element_size(), [](int64_t n, const auto& f) {
    at::parallel_for(0, n, 1, f);
  });
}

std::tuple<at::Tensor, at::Tensor> kd_rows_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const c10::optional<at::Tensor>& labels, int64_t div_id,
                                                   double param, double temperature, double soft_weight,
                                                   double hard_weight, int64_t ignore_index) {
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCPU);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.N}, f32);
  at::Tensor stats = at::empty({a.N, STATS_WIDTH}, f32);
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  at::parallel_for(0, a.N, grain_rows(a.V), [&](int64_t r0, int64_t r1) { cpu_forward_rows(a, r0, r1); });
  return {loss, stats};
}

at::Tensor kd_rows_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                           const c10::optional<at::Tensor>& labels, const at::Tensor& stats, int64_t div_id,
                           double param, double temperature, double soft_weight, double hard_weight,
                           int64_t ignore_index) {
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCPU);
  at::Tensor gl = check_grad_loss(grad_loss, a.N);
  at::Tensor st = check_stats(stats, a.N);
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  a.grad_loss = gl.data_ptr<float>();
  a.stats = const_cast<float*>(st.data_ptr<float>());
  a.grad = grad.data_ptr();
  prepare_gradient(grad);
  at::parallel_for(0, a.N, grain_rows(a.V), [&](int64_t r0, int64_t r1) { cpu_backward_rows(a, r0, r1); });
  return grad;
}

// Vocab-parallel pass 2: partial [N, 2] fp32 = per row (sum of phi, sum of q g) over this
// shard's columns, with the (global) normalisers given in stats; 0 on ignored rows.
at::Tensor kd_rows_given_stats_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                   const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                                   int64_t div_id, double param, double temperature,
                                   int64_t ignore_index) {
  TORCH_CHECK_VALUE(div_id != LOGIT_MSE, "kdkernels_C: kd_rows_given_stats (the vocab-parallel "
                    "pass) has no logit_mse kernel: logit_mse needs no softmax normalisers");
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, 1.0, 0.0,
                         ignore_index, at::kCPU);
  at::Tensor st = check_stats(stats, a.N);
  at::Tensor partial = at::empty({a.N, 2}, student.options().dtype(at::kFloat));
  a.stats = const_cast<float*>(st.data_ptr<float>());
  a.partial = partial.data_ptr<float>();
  at::parallel_for(0, a.N, grain_rows(a.V), [&](int64_t r0, int64_t r1) { cpu_given_stats_rows(a, r0, r1); });
  return partial;
}

// Fused forward and gradient: (loss [N] fp32, grad = grad_scale[i] * d loss_i / d student_i for
// every row i, a new contiguous tensor of the student's shape and dtype). grad_scale [N] (ones
// when None) is the grad_loss the caller expects backward to bring (1/N for a batch mean), so
// that no rescaling pass follows.
std::tuple<at::Tensor, at::Tensor> kd_rows_fwd_grad_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const c10::optional<at::Tensor>& labels, int64_t div_id,
                                                        double param, double temperature, double soft_weight,
                                                        double hard_weight, int64_t ignore_index,
                                                        const c10::optional<at::Tensor>& grad_scale) {
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCPU);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.N}, f32);
  at::Tensor stats = at::empty({a.N, STATS_WIDTH}, f32);  // for rows on the two-kernel path
  at::Tensor gl = grad_scale.has_value() ? check_grad_loss(*grad_scale, a.N) : at::ones({a.N}, f32);
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.grad_loss = gl.data_ptr<float>();
  a.grad = grad.data_ptr();
  prepare_gradient(grad);
  // One task per thread; the threads share the rows dynamically (cpu_forward_grad_rows).
  // Chunks of about one 2 MiB (huge) page of gradient: threads do not fault the same page.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 21) / (a.V * (int64_t)grad.element_size()));
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (a.N + chunk - 1) / chunk);
  std::atomic<int64_t> next{0};
  if (tasks <= 1)
    cpu_forward_grad_rows(a, next, chunk);
  else
    at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { cpu_forward_grad_rows(a, next, chunk); });
  return {loss, grad};
}

std::vector<std::string> divergence_names() {
  return std::vector<std::string>(kDivergenceNames, kDivergenceNames + NUM_DIVERGENCES);
}

int64_t stats_width() { return STATS_WIDTH; }

}  // namespace
}  // namespace kd

TORCH_LIBRARY(kdkernels_C, m) {
  m.def("kd_rows_fwd(Tensor student, Tensor teacher, Tensor? labels, int div_id, float param, "
        "float temperature, float soft_weight, float hard_weight, int ignore_index) -> (Tensor, Tensor)");
  m.def("kd_rows_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
        "int div_id, float param, float temperature, float soft_weight, float hard_weight, "
        "int ignore_index) -> Tensor");
  m.def("kd_rows_fwd_grad(Tensor student, Tensor teacher, Tensor? labels, int div_id, float param, "
        "float temperature, float soft_weight, float hard_weight, int ignore_index, Tensor? grad_scale) "
        "-> (Tensor, Tensor)");
  m.def("kd_rows_given_stats(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, int div_id, "
        "float param, float temperature, int ignore_index) -> Tensor");
  m.def("divergence_names() -> str[]", &kd::divergence_names);
  m.def("stats_width() -> int", &kd::stats_width);
}

TORCH_LIBRARY_IMPL(kdkernels_C, CPU, m) {
  m.impl("kd_rows_fwd", &kd::kd_rows_fwd_cpu);
  m.impl("kd_rows_bwd", &kd::kd_rows_bwd_cpu);
  m.impl("kd_rows_fwd_grad", &kd::kd_rows_fwd_grad_cpu);
  m.impl("kd_rows_given_stats", &kd::kd_rows_given_stats_cpu);
}

// A Python module so that `import kdkernels._C` loads the library and runs the registrations.
static PyModuleDef kd_module = {PyModuleDef_HEAD_INIT, "_C", "kdkernels C++ ops (torch.ops.kdkernels_C)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kd_module); }
