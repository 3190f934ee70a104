// Per-row pieces of the sparse (stored top-k teacher) loss, shared by the CPU kernels
// (csrc/cpu/sparse_cpu.cpp) and any future CUDA port. Plain C++, no torch; see docs/sparse.md.
//
// The student side of one row (V columns, K teacher slots, idx = -1 for an unused slot) needs:
//   forward : lse_B = logsumexp(s/T) (need_b), lse_A = logsumexp(s) and s[label] (need_a),
//             and the K gathered logits s[idx_k];
//   backward: grad_j = c_B exp(s_j/T - lse_B) + c_A exp(s_j - lse_A)          (every column)
//                      + g_k [j = idx_k] + g_lab [j = label]                   (K + 1 columns)
//             with c_B already holding the 1/T factor. A row whose coefficient is 0 (an ignored
//             row) gets exactly 0 from that term, even where s is NaN.
#pragma once

#include <stdint.h>

#include "kd_math.h"

namespace kd {

// Columns of the per-row statistics (fp32 [N, 3]); the Triton launcher uses the same layout.
enum SparseStatsCol : int { SP_LSE_B = 0, SP_LSE_A = 1, SP_S_LAB = 2, SP_STATS_WIDTH = 3 };

// Argument block of the sparse kernels: raw pointers, int64 offsets.
struct SparseArgs {
  // Student [B, L, V] with unit column stride: row r = (r / L, r % L).
  const void* s = nullptr;
  int64_t N = 0, L = 1, V = 0, K = 0;
  int64_t stride_b = 0, stride_l = 0;
  const int64_t* idx = nullptr;     // [N, K], -1 = unused slot (skipped)
  const int64_t* labels = nullptr;  // [N] (need_a only); outside [0, V): no label column
  float inv_t = 1.f;
  bool need_b = false, need_a = false;
  // forward outputs
  float* stats = nullptr;     // [N, 3]
  float* gathered = nullptr;  // [N, K]
  // backward inputs / output
  const float* c_b = nullptr;    // [N]
  const float* c_a = nullptr;    // [N]
  const float* g_idx = nullptr;  // [N, K]
  const float* g_lab = nullptr;  // [N]
  void* grad = nullptr;          // [N, V] contiguous, student dtype
};

inline int64_t sparse_row_offset(const SparseArgs& a, int64_t r) {
  return (r / a.L) * a.stride_b + (r % a.L) * a.stride_l;
}

// The dense part of the gradient of one element, from x = s_j and xb = s_j * inv_t. xb must be
// the product rounded to fp32 (computed and stored apart, never fused into the subtraction): the
// head in kdkernels/losses/sparse.py forms b = s * (1/T) the same way, and in bucket mode the gradient of
// the tail term cancels c_B softmax(b)_j against g_k, so both must see the same b. use_b / use_a
// are per-row flags (need_b && c_b != 0, need_a && c_a != 0): a zero coefficient contributes
// exactly 0, even for NaN logits.
KD_HD KD_INLINE float sparse_dense_grad(float x, float xb, bool use_b, float c_b, float lse_b,
                                        bool use_a, float c_a, float lse_a) {
  float g = 0.0f;
  if (use_b) g += c_b * exp_fast(xb - lse_b);
  if (use_a) g += c_a * exp_fast(x - lse_a);
  return g;
}

}  // namespace kd
