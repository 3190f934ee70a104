// Block helpers of the CPU row kernels (kd_cpu.cpp, ensemble_cpu.cpp): the V-block size, fp32
// block loads with the block maximum, the online (max, sum-exp) state, per-row label context,
// gradient stores. Header-only; each kernel file keeps its row functions in its own anonymous
// namespace and calls these.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kd_dtype.h"
#include "kd_math.h"
#include "kd_rows.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace kd {
namespace cpu_blocks {

constexpr int BLK = 1024;

// Gradient store of the fused kernel: fp32 rows bypass the caches (non-temporal stores: the
// fresh gradient is not read again here, and the scratch rows stay in L2); other dtypes as store().
// The caller fences (stream_fence) before the results are used.
template <class S>
inline void store_stream(const float* src, S* dst, int n) { store(src, dst, n); }

inline void store_stream(const float* src, float* dst, int n) {
#if defined(__AVX__)
  int i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  store(src, dst, n);
#endif
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// load_block and the block maximum in one sweep (fp32, bf16); fp16 converts first (F16C).
inline float load_block_max(const float* src, float* dst, int n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) {
    const float v = src[i];
    dst[i] = v;
    m = v > m ? v : m;
  }
  return m;
}

inline float load_block_max(const bf16_t* src, float* dst, int n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) {
    const float v = bits_to_float((int32_t)src[i].x << 16);
    dst[i] = v;
    m = v > m ? v : m;
  }
  return m;
}

// Ask for the next block of a row while this one is computed (the exponentials of a block take
// longer than its loads from memory, so the reads overlap the arithmetic).
template <class S>
inline void prefetch_block(const S* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * (int64_t)sizeof(S); off += 64) __builtin_prefetch(c + off, 0, 3);
}

// ---- block reductions -------------------------------------------------------------------------
inline float block_max(const float* x, int n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float load_block_max(const f16_t* src, float* dst, int n) {
  load_block(src, dst, n);
  return block_max(dst, n);
}

// Online (max, sum-exp) state of one distribution over a row: z = sum e^{(x - m) invT}, the
// maximum m in the units of x (raw logits; invT = 1 / T, 1 for the hard term's s).
struct Online {
  float m = kNegInf, z = 0.f;
  // Absorb a block whose max is bm; returns the factor previous sums were rescaled by.
  float raise(float bm, float invT = 1.f) {
    float mn = bm > m ? bm : m;
    float r = rescale(m, mn, invT);
    z *= r;
    m = mn;
    return r;
  }
  float lse() const { return logsumexp_from(m, z); }
};

// Sum of e^{(x - offset) invT} over a block: raw logits x and a raw offset, the shift first
// (invT = 1 / T; 1 for the hard term's s).
inline float sum_exp(const float* x, int n, float offset, float invT = 1.0f) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += exp_fast((x[i] - offset) * invT);
  return s;
}

struct RowCtx {
  bool soft, hard, hard_separate;  // hard_separate: logsumexp(s) needs its own pass (T != 1)
  bool ignored, bad_label;
  int64_t label;
};

inline RowCtx row_context(const RowsArgs& a, int64_t r) {
  RowCtx c;
  c.soft = a.soft_weight != 0.f;
  c.label = a.labels ? a.labels[r] : 0;
  c.ignored = a.labels && c.label == a.ignore_index;
  c.hard = a.labels && a.hard_weight != 0.f;
  c.bad_label = c.hard && (c.label < 0 || c.label >= a.V);
  c.hard_separate = c.hard && !(c.soft && a.temperature == 1.f);
  return c;
}

// Writes v over one gradient row.
template <class S>
void fill_row(S* g, int64_t V, float v) {
  alignas(64) float b[BLK];
  for (int i = 0; i < BLK; ++i) b[i] = v;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) store(b, g + j0, (int)std::min<int64_t>(BLK, V - j0));
}

}  // namespace cpu_blocks
}  // namespace kd
