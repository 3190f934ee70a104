// Argument block of the row kernels, shared by the CPU kernels, the CUDA launchers and the torch
// bindings. Plain C++ (no torch, no CUDA headers), raw pointers, int64 offsets.
// Row r of the teacher is (r / t_L, r % t_L): the [B, L] split of each view is its own.
#pragma once

#include <stdint.h>

#include <atomic>

namespace kd {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct RowsArgs {
  // Inputs: student [B, L, V] and teacher [B, L, >= V] with unit column stride; row r of the
  // N = B * L rows is (b, l) = (r / L, r % L), at offset b * stride_b + l * stride_l elements.
  const void* student = nullptr;
  const void* teacher = nullptr;
  const int64_t* labels = nullptr;  // [N] or null
  int64_t N = 0, L = 1, V = 0;
  int64_t t_L = 1;  // the teacher's own row split (B_t * t_L = N); it may differ from the student's
  int64_t s_stride_b = 0, s_stride_l = 0, t_stride_b = 0, t_stride_l = 0;
  int dtype = F32;
  int div = 0;
  float param = 0.f, temperature = 1.f, soft_weight = 1.f, hard_weight = 0.f;
  int64_t ignore_index = -100;
  // Forward outputs: loss [N] fp32, stats [N, STATS_WIDTH] fp32 (also a backward input).
  float* loss = nullptr;
  float* stats = nullptr;
  // Backward: grad_loss [N] fp32 in, grad [N, V] contiguous (student dtype) out.
  const float* grad_loss = nullptr;
  void* grad = nullptr;
  // Given-statistics pass (vocab-parallel): stats [N, STATS_WIDTH] in (only the normalisers
  // STAT_MA .. STAT_LZB are read), partial [N, 2] fp32 out: per row the sums over the row's V
  // columns of phi and of q g (kd_math.h div_terms).
  float* partial = nullptr;
};

inline int64_t student_offset(const RowsArgs& a, int64_t r) {
  return (r / a.L) * a.s_stride_b + (r % a.L) * a.s_stride_l;
}
inline int64_t teacher_offset(const RowsArgs& a, int64_t r) {
  return (r / a.t_L) * a.t_stride_b + (r % a.t_L) * a.t_stride_l;
}

// CPU kernels (csrc/cpu/kd_cpu.cpp): rows [row_begin, row_end), single-threaded; the caller
// spreads row ranges over threads.
void cpu_forward_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end);
void cpu_backward_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end);
// The given-statistics pass: a.stats in, a.partial out (see RowsArgs).
void cpu_given_stats_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end);
// Fused forward and gradient for a grad_loss [N] known in advance: writes loss and grad; stats
// ([N, STATS_WIDTH]) must be given too, for rows that take the two-kernel path. Each calling
// thread takes `chunk` rows at a time from `next` until all N rows are done.
void cpu_forward_grad_rows(const RowsArgs& args, std::atomic<int64_t>& next, int64_t chunk);
// logit_mse (div LOGIT_MSE, csrc/cpu/mse_cpu.cpp; stats layout in kd_mse.h): the same three
// entry points for its own kernels. The ones above hand LOGIT_MSE rows to these.
void cpu_mse_forward_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end);
void cpu_mse_backward_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end);
void cpu_mse_forward_grad_rows(const RowsArgs& args, std::atomic<int64_t>& next, int64_t chunk);
// (The memory policy of the gradient buffers, huge pages and page population: kd_mem.h.)

}  // namespace kd
