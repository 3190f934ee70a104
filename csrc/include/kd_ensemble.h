// Argument block of the teacher-ensemble row kernels (csrc/cpu/ensemble_cpu.cpp): the target is
// p = sum_m w_m softmax(t_m / T) over M teachers. Plain C++ (no torch), like kd_rows.h.
//
// Per-row stats, fp32, width ensemble_stats_width(M) = STATS_WIDTH + 2 (M - 1): columns 0..6 as
// the single-teacher kernels' (kd_math.h StatsCol) with teacher 0's (max, log sum-exp) of t_0/T in
// STAT_MA, STAT_LZA, then (max, log sum-exp) of t_m/T for m = 1 .. M-1 at STATS_WIDTH + 2 (m - 1)
// and the column after it. A teacher of weight 0 takes no part (its columns are written as 0);
// c (STAT_C) is sum_k q_k g_k of the ensemble target (-1 for forward KL). Ignored rows: all 0.
#pragma once

#include <stdint.h>

#include "kd_math.h"
#include "kd_rows.h"

namespace kd {

inline int64_t ensemble_stats_width(int64_t M) { return STATS_WIDTH + 2 * (M - 1); }
// The column of teacher m's max; its log sum-exp is the next column.
inline int64_t ensemble_stat_ma(int64_t m) { return m == 0 ? STAT_MA : STATS_WIDTH + 2 * (m - 1); }

struct EnsembleArgs {
  // The student, labels, scalars and outputs as in the single-teacher kernels (rows.teacher and
  // its strides are unused; rows.stats has stats_width columns).
  RowsArgs rows;
  int64_t M = 0;                          // teachers, each [B_m, L_m, >= V], unit column stride
  const void* const* teachers = nullptr;  // [M] data pointers
  const int64_t* t_L = nullptr;           // [M] each teacher's own row split (B_m * L_m = N)
  const int64_t* t_stride_b = nullptr;    // [M]
  const int64_t* t_stride_l = nullptr;    // [M]
  const float* weights = nullptr;         // [M], >= 0 (they sum to 1)
  int64_t stats_width = STATS_WIDTH;      // ensemble_stats_width(M)
};

inline int64_t ensemble_teacher_offset(const EnsembleArgs& e, int64_t m, int64_t r) {
  return (r / e.t_L[m]) * e.t_stride_b[m] + (r % e.t_L[m]) * e.t_stride_l[m];
}

// Rows [row_begin, row_end), single-threaded (the caller spreads row ranges over threads).
// Forward: rows.loss [N] and rows.stats [N, stats_width] out.
void cpu_ensemble_forward_rows(const EnsembleArgs& e, int64_t row_begin, int64_t row_end);
// Backward: rows.grad_loss [N] and rows.stats in, rows.grad [N, V] (student dtype) out.
void cpu_ensemble_backward_rows(const EnsembleArgs& e, int64_t row_begin, int64_t row_end);
// Fused forward and gradient for rows.grad_loss given in advance: loss, stats and grad out.
void cpu_ensemble_forward_grad_rows(const EnsembleArgs& e, int64_t row_begin, int64_t row_end);

}  // namespace kd
