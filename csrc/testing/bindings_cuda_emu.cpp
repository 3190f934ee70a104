// Torch ops over the emulated CUDA kernels (tests only; kdkernels/cuda_emulate.py builds this with
// torch.utils.cpp_extension.load when KDKERNELS_CUDA_EMULATE=1). Namespace kdkernels_cuda_emu:
// the real kdkernels_C ops keep their CPU and CUDA kernels. CPU tensors in, the kernels of
// csrc/cuda/kd_cuda.cu run on them through the launchers kd::cuda_forward_rows / _backward_rows.
// No emulation header here (its macros would clash with ATen): the two runtime calls used are
// declared below.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_cuda.h"
#include "kd_math.h"
#include "kd_rows.h"
#include "kd_torch_checks.h"
#include "cuda_emu_host.h"


namespace kd {
namespace {

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "kdkernels (emulated CUDA): ", what, " launch failed: ", cuda_error_string(code),
              " (", kd_emu::last_fault(), ")");
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& student, const at::Tensor& teacher,
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
  check_launch(cuda_forward_rows(a, nullptr), "forward");
  return {loss, stats};
}

at::Tensor bwd(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
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
  check_launch(cuda_backward_rows(a, nullptr), "backward");
  return grad;
}

std::tuple<at::Tensor, at::Tensor> fwd_grad(const at::Tensor& student, const at::Tensor& teacher,
                                            const c10::optional<at::Tensor>& labels, int64_t div_id,
                                            double param, double temperature, double soft_weight,
                                            double hard_weight, int64_t ignore_index,
                                            const c10::optional<at::Tensor>& grad_scale) {
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, soft_weight,
                         hard_weight, ignore_index, at::kCPU);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.N}, f32);
  at::Tensor gl = grad_scale.has_value() ? check_grad_loss(*grad_scale, a.N) : at::ones({a.N}, f32);
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  a.loss = loss.data_ptr<float>();
  a.grad_loss = gl.data_ptr<float>();
  a.grad = grad.data_ptr();
  check_launch(cuda_forward_grad_rows(a, nullptr), "fused forward");
  return {loss, grad};
}

// In place: grad (a [B, L, V] view, unit column stride) rows times grad_loss / grad_scale; rows
// whose ratio is exactly 1 are not touched (no host synchronisation to skip the rescaling).
void rescale_rows_emu(at::Tensor grad, const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_scale) {
  const RescaleInputs in = check_rescale(grad, grad_loss, grad_scale);
  check_launch(cuda_rescale_rows(grad.data_ptr(), dtype_code(grad.scalar_type()), in.gl.data_ptr<float>(),
                                 in.gs.defined() ? in.gs.data_ptr<float>() : nullptr, in.N, grad.size(2),
                                 grad.size(1), grad.stride(0), grad.stride(1), nullptr),
               "rescale");
}

// Test hook: leave `code` as the emulated runtime's pending error, as an earlier, unrelated
// failing CUDA call would; the next launch must not report it as its own.
void set_pending_error(int64_t code) { kd_emu::set_last_error((int)code); }

// Vocab-parallel pass 2 (kd_rows.h RowsArgs::partial): [N, 2] fp32 per-row sums over the
// shard with the normalisers given in stats.
at::Tensor given_stats_emu(const at::Tensor& student, const at::Tensor& teacher,
                         const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                         int64_t div_id, double param, double temperature, int64_t ignore_index) {
  RowsArgs a = make_args(student, teacher, labels, div_id, param, temperature, 1.0, 0.0,
                         ignore_index, at::kCPU);
  at::Tensor st = check_stats(stats, a.N);
  at::Tensor partial = at::empty({a.N, 2}, student.options().dtype(at::kFloat));
  a.stats = const_cast<float*>(st.data_ptr<float>());
  a.partial = partial.data_ptr<float>();
  check_launch(cuda_given_stats_rows(a, nullptr), "given-statistics");
  return partial;
}

// Test hook: the emulation's counters since the process started (launches, CTAs, barrier
// completions, shuffles): which kernel configuration a call ran (cluster_grad_kernel: N * C CTAs).
std::vector<int64_t> emu_counters() {
  const kd_emu::Counters c = kd_emu::counters();
  return {(int64_t)c.launches, (int64_t)c.ctas, (int64_t)c.syncthreads, (int64_t)c.shuffles};
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY(kdkernels_cuda_emu, m) {
  m.def("kd_rows_fwd(Tensor student, Tensor teacher, Tensor? labels, int div_id, float param, "
        "float temperature, float soft_weight, float hard_weight, int ignore_index) -> (Tensor, Tensor)");
  m.def("kd_rows_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
        "int div_id, float param, float temperature, float soft_weight, float hard_weight, "
        "int ignore_index) -> Tensor");
  m.def("kd_rows_given_stats(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, int div_id, "
        "float param, float temperature, int ignore_index) -> Tensor");
  m.def("kd_rows_fwd_grad(Tensor student, Tensor teacher, Tensor? labels, int div_id, float param, "
        "float temperature, float soft_weight, float hard_weight, int ignore_index, "
        "Tensor? grad_scale) -> (Tensor, Tensor)");
  m.def("kd_rows_rescale_(Tensor(a!) grad, Tensor grad_loss, Tensor? grad_scale) -> ()");
  m.def("set_pending_error(int code) -> ()");
  m.def("emu_counters() -> int[]");
}

TORCH_LIBRARY_IMPL(kdkernels_cuda_emu, CPU, m) {
  m.impl("kd_rows_fwd", &kd::fwd);
  m.impl("kd_rows_bwd", &kd::bwd);
  m.impl("kd_rows_given_stats", &kd::given_stats_emu);
  m.impl("kd_rows_fwd_grad", &kd::fwd_grad);
  m.impl("kd_rows_rescale_", &kd::rescale_rows_emu);
}

TORCH_LIBRARY_IMPL(kdkernels_cuda_emu, CompositeExplicitAutograd, m) {
  m.impl("set_pending_error", &kd::set_pending_error);
  m.impl("emu_counters", &kd::emu_counters);
}
