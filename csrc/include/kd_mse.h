// logit_mse (divergence id LOGIT_MSE = 6): the per-element math and the stats layout shared by
// the CPU (csrc/cpu/mse_cpu.cpp) and CUDA (csrc/cuda/mse_cuda.cuh) kernels.
//
// Per row, with d_i = t_i - s_i on the kept columns (those where teacher and student are not both
// -inf), n their count, mu = mean of d over them and c_i = d_i - mu = t~_i - s~_i (the
// row-centred logits' difference):
//   loss = soft_weight * sum c_i^2 / (2 n) + hard_weight * CE(softmax(s), label)   (no T, no T^2)
//   d loss / d s_j = -soft_weight * c_j / n (0 on the columns left out) + the hard term's
//   softmax(s)_j - [j = label]   (the mu term of the chain rule is sum_i c_i / n^2 = 0).
// n = 0 (every column -inf in both) gives loss 0 (the reference's n clamped to 1). -inf in only
// one of t_i, s_i makes d_i and mu infinite (or NaN): the loss is NaN, and the row's gradient NaN
// in every element (the +inf-loss gradient rule of docs/precision.md; mse_grad_defined below).
//
// Stats row (fp32, STATS_WIDTH columns) of a counted row:
//   0: mu   1: n   2: -mu   3: n   4: 0   5, 6: (max, log sum-exp) of s at T = 1 as the other
//   divergences store them in that backend (the hard term; 0 when it is off). With the soft term
//   off (soft_weight = 0) mu and n are 0: nothing reads them then. Ignored rows: all zeros.
// Backward reads mu from column 0, n from column 1 (and 5, 6 for the hard term) only, so that the
// swapped row (columns (0, 1) <-> (2, 3), teacher and student exchanged) is the same loss with
// the roles exchanged: backward_rows(grad, teacher, student, labels, swapped, ..., hard_weight=0)
// is the gradient with respect to the teacher (d' = -d, mu' = -mu, c' = -c).
#pragma once

#include "kd_math.h"

namespace kd {

enum MseStatsCol : int { MSE_MU = 0, MSE_N = 1, MSE_NEG_MU = 2, MSE_N_SWAPPED = 3, MSE_ZERO = 4 };

// A kept column: not -inf in both (NaN counts as kept, so that it reaches the loss).
KD_HD KD_INLINE bool mse_kept(float t, float s) { return !(t == kNegInf && s == kNegInf); }

// d = t - s on a kept column, 0 on a column left out (pass 1 sums it).
KD_HD KD_INLINE float mse_diff(float t, float s) { return mse_kept(t, s) ? t - s : 0.0f; }

// c = (t - s) - mu on a kept column, 0 on a column left out. The difference t - s is rounded once
// (exact for inputs of one binade or of 16-bit dtypes), then centred: at |logits| ~ 1e4 no
// rounding of size ulp(mean(t)) or ulp(mean(s)) enters, as it would from centring t and s apart.
KD_HD KD_INLINE float mse_centred(float t, float s, float mu) {
  return mse_kept(t, s) ? (t - s) - mu : 0.0f;
}

// The divisor n of the mean and of the loss: at least 1 (an all -inf row has n = 0 and sums 0).
KD_HD KD_INLINE float mse_divisor(float n) { return n > 1.0f ? n : 1.0f; }

// mu from the sum of d and the count (0 for an empty row). A: the accumulator type, double on the
// CPU, float on the GPU (a double division there is a called subroutine: ptxas spilled around it).
template <class A>
KD_HD KD_INLINE float mse_mean(A sum_d, float n) { return (float)(sum_d / (A)mse_divisor(n)); }

// The gradient of a row is defined (finite) exactly when mu is finite: an infinite or NaN mu is a
// -inf in one model only (or a NaN input), and the row is then NaN throughout.
KD_HD KD_INLINE bool mse_grad_defined(float mu) { return mu - mu == 0.0f; }

// The soft loss of a row from sum c^2 (NaN when mu is not finite: the reference's inf - inf).
template <class A>
KD_HD KD_INLINE float mse_loss(A sum_c2, float n, float mu) {
  return mse_grad_defined(mu) ? (float)(sum_c2 / ((A)2 * (A)mse_divisor(n))) : NAN;
}

// One element of the gradient with respect to s: k_soft = grad_loss * soft_weight / n,
// k_hard = grad_loss * hard_weight, sm = softmax(s)_j at T = 1 (anything when k_hard = 0).
KD_HD KD_INLINE float mse_grad_element(float t, float s, float mu, float k_soft, float k_hard,
                                       float sm, float onehot) {
  return -k_soft * mse_centred(t, s, mu) + k_hard * (sm - onehot);
}

KD_HD KD_INLINE void store_mse_stats(float* st, float mu, float n, LogNorm ns) {
  st[MSE_MU] = mu;
  st[MSE_N] = n;
  st[MSE_NEG_MU] = -mu;
  st[MSE_N_SWAPPED] = n;
  st[MSE_ZERO] = 0.0f;
  st[STAT_MS] = ns.m;
  st[STAT_LZS] = ns.lz;
}

// Compensated (Kahan) fp32 sum, for the GPU kernels' sums across a thread's chunks (the CPU
// kernels sum in double): error ~2 ulps of the total however many chunks a thread takes.
// No multiplications, so FMA contraction (--use_fast_math) cannot break the compensation.
struct KahanSum {
  float sum, comp;
  KD_HD KD_INLINE void init() {
    sum = 0.0f;
    comp = 0.0f;
  }
  KD_HD KD_INLINE void add(float x) {
    const float y = x - comp;
    const float t = sum + y;
    comp = (t - sum) - y;
    sum = t;
  }
};

}  // namespace kd
