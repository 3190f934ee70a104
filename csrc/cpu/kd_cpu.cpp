// CPU row kernels: the passes of DESIGN.md §3 over V-blocks of one row at a time.
//
// Each block of up to BLK elements is converted to fp32 (and divided by T) into small stack
// buffers that stay in L1; the per-element math of kd_math.h then runs in `omp simd` loops that
// the compiler vectorizes (AVX2 + FMA when built with those flags). No [N, V] temporaries: the
// only large write is the gradient. Threading is the caller's (row ranges, see bindings.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kd_math.h"
#include "kd_rows.h"

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kd {
namespace {

constexpr int BLK = 1024;

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

// ---- fp32 conversion of one block ---------------------------------------------------------------
inline void load_scaled(const float* src, float* dst, int n, float scale) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

inline void load_scaled(const bf16_t* src, float* dst, int n, float scale) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = bits_to_float((int32_t)src[i].x << 16) * scale;
}

inline float half_to_float_scalar(uint16_t h) {
  // IEEE binary16 -> binary32, exact (normal, subnormal, inf, NaN).
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float out;
  if (exp == 0) {
    out = (float)man * 5.9604644775390625e-8f;  // 2^-24
    out = sign ? -out : out;
    return out;
  }
  uint32_t bits = sign | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  std::memcpy(&out, &bits, 4);
  return out;
}

inline void load_scaled(const f16_t* src, float* dst, int n, float scale) {
  int i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(scale)));
  }
#endif
  for (; i < n; ++i) dst[i] = half_to_float_scalar(src[i].x) * scale;
}

inline float load_one(const float* p) { return *p; }
inline float load_one(const bf16_t* p) { return bits_to_float((int32_t)p->x << 16); }
inline float load_one(const f16_t* p) { return half_to_float_scalar(p->x); }

// ---- block store in the output dtype (round to nearest even) ------------------------------------
inline void store(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }

inline void store(const float* src, bf16_t* dst, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    uint32_t b = (uint32_t)float_to_bits(src[i]);
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    bool nan = (b & 0x7fffffffu) > 0x7f800000u;
    dst[i].x = (uint16_t)(nan ? 0x7fc0u : r);
  }
}

inline uint16_t float_to_half_scalar(float f) {
  // binary32 -> binary16, round to nearest even, overflow to inf, NaN kept.
  uint32_t x = (uint32_t)float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {                                   // subnormal or zero in half
    float a = bits_to_float((int32_t)ax) * 16777216.0f;     // * 2^24: units of the half ulp
    uint32_t m = (uint32_t)std::nearbyint(a);
    return (uint16_t)(sign | m);
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);
  return (uint16_t)(sign | (r >> 13));
}

inline void store(const float* src, f16_t* dst, int n) {
  int i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i].x = float_to_half_scalar(src[i]);
}

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

// load_scaled and the block maximum in one sweep (fp32, bf16); fp16 converts first (F16C).
inline float load_scaled_max(const float* src, float* dst, int n, float scale) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) {
    const float v = src[i] * scale;
    dst[i] = v;
    m = v > m ? v : m;
  }
  return m;
}

inline float load_scaled_max(const bf16_t* src, float* dst, int n, float scale) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) {
    const float v = bits_to_float((int32_t)src[i].x << 16) * scale;
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

inline float load_scaled_max(const f16_t* src, float* dst, int n, float scale) {
  load_scaled(src, dst, n, scale);
  return block_max(dst, n);
}

// Online (max, sum-exp) state of one distribution over a row.
struct Online {
  float m = kNegInf, z = 0.f;
  // Absorb a block whose max is bm; returns the factor previous sums were rescaled by.
  float raise(float bm) {
    float mn = bm > m ? bm : m;
    float r = rescale(m, mn);
    z *= r;
    m = mn;
    return r;
  }
  float lse() const { return logsumexp_from(m, z); }
};

inline float sum_exp(const float* x, int n, float offset) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += exp_fast(x[i] - offset);
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

template <class S, int DIV>
void forward_row(const RowsArgs& a, int64_t r) {
  const RowCtx c = row_context(a, r);
  float* st = a.stats + r * STATS_WIDTH;
  if (c.ignored) {
    a.loss[r] = 0.f;
    for (int k = 0; k < STATS_WIDTH; ++k) st[k] = 0.f;
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  const int64_t V = a.V;
  const float invT = 1.0f / a.temperature;
  alignas(64) float ab[BLK], bb[BLK], xb[BLK];

  // Pass 1: statistics, and the loss itself for the online divergences: each block's sums are
  // taken against the raised running maxima and absorbed into the row state (kd_math.h OnlineKL,
  // the same update and merge the CUDA kernel uses).
  OnlineKL<DIV> on;
  on.init();
  Online os;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    if (c.soft) {
      load_scaled(t + j0, ab, n, invT);
      load_scaled(s + j0, bb, n, invT);
      const float nma = raise_max(on.ma, block_max(ab, n));
      const float nmb = raise_max(on.mb, block_max(bb, n));
      const float offa = safe_max(nma), offb = safe_max(nmb);
      float za = 0.f, zb = 0.f, sacc = 0.f;
      if (DIV == FORWARD_KL || DIV == REVERSE_KL) {
#pragma omp simd reduction(+ : za, zb, sacc)
        for (int i = 0; i < n; ++i) {
          const float ea = exp_fast(ab[i] - offa), eb = exp_fast(bb[i] - offb);
          za += ea;
          zb += eb;
          sacc += online_kl_term<DIV>(ab[i], bb[i], offa, offb, ea, eb);
        }
      } else {
        za = sum_exp(ab, n, offa);
        zb = sum_exp(bb, n, offb);
      }
      on.absorb(nma, nmb, za, zb, sacc);
    }
    if (c.hard_separate) {
      load_scaled(s + j0, xb, n, 1.0f);
      os.raise(block_max(xb, n));
      os.z += sum_exp(xb, n, safe_max(os.m));
    }
  }

  LogNorm na{0.f, 0.f}, nb{0.f, 0.f};
  float cc = 0.f, D = 0.f;
  if (c.soft) {
    na = lognorm_from(on.ma, on.za);
    nb = lognorm_from(on.mb, on.zb);
    if (DIV == FORWARD_KL) {
      D = on.divergence();
      cc = -1.f;
    } else if (DIV == REVERSE_KL) {
      D = on.divergence();
      cc = D + 1.f;
    } else {
      // Pass 2: the divergence and c = sum q g, from the row normalisers.
      // Summed in double: c adds q g terms as large as |log p| (4e4 for one-hot teachers at
      // |logits| 1e4), and q (g - c) cancels them; fp32 lane sums lost ~20 ulps of 4e4 there.
      double sphi = 0., sqg = 0.;
      for (int64_t j0 = 0; j0 < V; j0 += BLK) {
        const int n = (int)std::min<int64_t>(BLK, V - j0);
        load_scaled(t + j0, ab, n, invT);
        load_scaled(s + j0, bb, n, invT);
        const DivParam param = div_param<DIV>(a.param);
        double bphi = 0., bqg = 0.;
#pragma omp simd reduction(+ : bphi, bqg)
        for (int i = 0; i < n; ++i) {
          const float lp = log_prob(ab[i], na), lq = log_prob(bb[i], nb);
          float phi, qg;
          div_terms<DIV>(lp, lq, exp_fast(lp), exp_fast(lq), param, phi, qg);
          bphi += phi;
          bqg += qg;
        }
        sphi += bphi;
        sqg += bqg;
      }
      D = (lognorm_nan(na) || lognorm_nan(nb)) ? NAN : sphi;  // NaN input: terms with q = NaN read as 0
      cc = sqg;
    }
  }
  const LogNorm ns = c.hard_separate ? lognorm_from(os.m, os.z) : nb;
  const float ce = !c.hard ? 0.f : c.bad_label ? NAN : hard_ce(ns, load_one(s + c.label));
  a.loss[r] = row_loss(c.soft, a.soft_weight, a.temperature, D, c.hard, a.hard_weight, ce);
  store_row_stats(st, RowStats{na, nb, cc, ns});
}

// Gradient of one block into gb. MODE 0: soft only; 1: soft + hard at T = 1 (softmax(s) = q);
// 2: soft + hard with its own normaliser ns; 3: hard only.
template <int DIV, int MODE>
void grad_block(const float* __restrict ab, const float* __restrict bb,
                const float* __restrict xb, float* __restrict gb, int n, LogNorm na, LogNorm nb,
                float cc, LogNorm ns, float k_soft, float k_hard, DivParam param) {
  // reverse KL: cc is c' = sum_k q_k x_k of backward_row; qg - q c = q (x - c') is formed in qg
  const float krev = DIV == REVERSE_KL ? reverse_kl_offset(na, nb) : 0.f;
  const float crev = cc;
  if (DIV == REVERSE_KL) cc = 0.f;
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    float out;
    if (MODE == 3) {
      out = k_hard * exp_fast(log_prob(xb[i], ns));
    } else {
      const float lp = log_prob(ab[i], na), lq = log_prob(bb[i], nb);
      const float p = exp_fast(lp), q = exp_fast(lq);
      float phi, qg;
      div_terms<DIV>(lp, lq, p, q, param, phi, qg);
      if (DIV == REVERSE_KL) qg = reverse_kl_qg(q, ab[i], bb[i], krev, crev);
      if (MODE == 0) out = k_soft * (qg - q * cc);
      else if (MODE == 1) out = grad_element(k_soft, qg, q, cc, k_hard, q, 0.f);
      else out = grad_element(k_soft, qg, q, cc, k_hard, exp_fast(log_prob(xb[i], ns)), 0.f);
    }
    gb[i] = out;
  }
}

template <class S, int DIV>
void backward_row(const RowsArgs& a, int64_t r) {
  const RowCtx c = row_context(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const int64_t V = a.V;
  alignas(64) float ab[BLK], bb[BLK], xb[BLK], gb[BLK];
  if (c.ignored) {
    std::memset(gb, 0, sizeof gb);
    for (int64_t j0 = 0; j0 < V; j0 += BLK) store(gb, g + j0, (int)std::min<int64_t>(BLK, V - j0));
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  const RowStats rs = load_row_stats(a.stats + r * STATS_WIDTH);
  const LogNorm na = rs.na, nb = rs.nb, ns = rs.ns;
  const float gl = a.grad_loss[r];
  const float k_soft = c.soft ? gl * a.soft_weight * a.temperature : 0.f;
  const float k_hard = c.hard ? (c.bad_label ? NAN : gl * a.hard_weight) : 0.f;
  const float invT = 1.0f / a.temperature;
  const DivParam param = div_param<DIV>(a.param);
  const bool soft = c.soft, hard = c.hard, sep = c.hard_separate;
  float cc = rs.c;
  if (DIV == REVERSE_KL && soft) {
    // Reverse KL: d/db_j = q_j (x_j - c') with x_j = (b_j - a_j) - k (k per row, kd_math.h) and
    // c' = sum_k q_k x_k summed here from the same rounded x_k, so that for near one-hot rows
    // at |logits| ~ 1e4 the rounding of the dominant x_j cancels in x_j - c' (as it does in
    // autograd) instead of leaving ulp(1e4)-sized errors. One more read of the row.
    const float k = reverse_kl_offset(na, nb);
    float sum = 0.f;
    for (int64_t j0 = 0; j0 < V; j0 += BLK) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      load_scaled(t + j0, ab, n, invT);
      load_scaled(s + j0, bb, n, invT);
      float bs = 0.f;
#pragma omp simd reduction(+ : bs)
      for (int i = 0; i < n; ++i) {
        const float q = exp_fast(log_prob(bb[i], nb));
        bs += reverse_kl_qx(q, ab[i], bb[i], k);
      }
      sum += bs;
    }
    cc = sum;
  }

  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    if (soft) {
      load_scaled(t + j0, ab, n, invT);
      load_scaled(s + j0, bb, n, invT);
    }
    if (sep) load_scaled(s + j0, xb, n, 1.0f);
    if (soft && !hard)
      grad_block<DIV, 0>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param);
    else if (soft && !sep)  // hard term at T = 1: softmax(s) = q
      grad_block<DIV, 1>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param);
    else if (soft)
      grad_block<DIV, 2>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param);
    else if (hard)
      grad_block<DIV, 3>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param);
    else
      std::memset(gb, 0, sizeof(float) * n);
    if (hard && !c.bad_label && c.label >= j0 && c.label < j0 + n) gb[c.label - j0] -= k_hard;
    store(gb, g + j0, n);
  }
}

// ---- fused forward + gradient (for a grad_loss given in advance, a.grad_loss) -------------------
// The row is read from memory once: pass 1 converts t/T and s/T into the per-thread fp32 scratch
// rows x and y (V floats each, in L2 for V up to ~128k) and finds the maxima; pass 2 computes each
// exponential once and keeps it in the scratch (forward / reverse KL: the loss accumulates there
// too); the other divergences take one more pass for the loss and c = sum q g, which stores qg and
// q; the last pass writes the gradient from the stored values. Rows this path does not cover
// (ignored rows, no soft term, a hard term at T != 1, a label out of range) take the two-kernel
// path forward_row + backward_row with the same grad_loss, which gives the same values.
template <class S, int DIV>
void fused_row(const RowsArgs& a, int64_t r, float* __restrict x, float* __restrict y,
               float* __restrict offs) {
  const RowCtx c = row_context(a, r);
  if (c.ignored || !c.soft || c.hard_separate || c.bad_label) {
    forward_row<S, DIV>(a, r);
    backward_row<S, DIV>(a, r);
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const int64_t V = a.V;
  const float invT = 1.0f / a.temperature;
  const DivParam param = div_param<DIV>(a.param);

  float ma, mb, za = 0.f, zb = 0.f, D, cc = 0.f;
  if (DIV == FORWARD_KL || DIV == REVERSE_KL) {
    // One pass from memory, block by block: convert, raise the running maxima, and keep
    // e^{a - offa_k}, e^{b - offb_k} against the offsets of block k (offs[k]); the loss
    // accumulates online (DESIGN.md §3). The loads of a block overlap the exponentials.
    OnlineKL<DIV> on;
    on.init();
    for (int64_t j0 = 0, k = 0; j0 < V; j0 += BLK, ++k) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      float* __restrict xb = x + j0;
      float* __restrict yb = y + j0;
      prefetch_block(t + j0 + BLK, std::min<int64_t>(BLK, V - j0 - BLK));
      prefetch_block(s + j0 + BLK, std::min<int64_t>(BLK, V - j0 - BLK));
      const float nma = raise_max(on.ma, load_scaled_max(t + j0, xb, n, invT));
      const float nmb = raise_max(on.mb, load_scaled_max(s + j0, yb, n, invT));
      const float offa = safe_max(nma), offb = safe_max(nmb);
      offs[2 * k] = offa;
      offs[2 * k + 1] = offb;
      float bza = 0.f, bzb = 0.f, bacc = 0.f;
#pragma omp simd reduction(+ : bza, bzb, bacc)
      for (int i = 0; i < n; ++i) {
        const float av = xb[i], bv = yb[i];
        const float ea = exp_nonpos(av - offa), eb = exp_nonpos(bv - offb);
        bza += ea;
        bzb += eb;
        bacc += online_kl_term<DIV>(av, bv, offa, offb, ea, eb);
        if (DIV == FORWARD_KL)
          xb[i] = ea;
        else
          xb[i] = (bv - offb) - (av - offa);  // small where q matters, even at |logits| ~ 1e4
        yb[i] = eb;
      }
      on.absorb(nma, nmb, bza, bzb, bacc);
    }
    ma = on.ma;
    mb = on.mb;
    za = on.za;
    zb = on.zb;
    D = on.divergence();
  } else {
    // Pass 1: scaled fp32 copies and maxima.
    ma = kNegInf;
    mb = kNegInf;
    for (int64_t j0 = 0; j0 < V; j0 += BLK) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      ma = std::max(ma, load_scaled_max(t + j0, x + j0, n, invT));
      mb = std::max(mb, load_scaled_max(s + j0, y + j0, n, invT));
    }
    const float offa = safe_max(ma), offb = safe_max(mb);
    // Pass 2: the sums.
    for (int64_t j0 = 0; j0 < V; j0 += BLK) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      const float* __restrict xb = x + j0;
      const float* __restrict yb = y + j0;
      float bza = 0.f, bzb = 0.f;
#pragma omp simd reduction(+ : bza, bzb)
      for (int i = 0; i < n; ++i) {
        bza += exp_nonpos(xb[i] - offa);
        bzb += exp_nonpos(yb[i] - offb);
      }
      za += bza;
      zb += bzb;
    }
    const LogNorm na = lognorm_from(ma, za), nb = lognorm_from(mb, zb);
    // Pass 3: the divergence and c; qg and q replace a and b in the scratch.
    double sphi = 0., sqg = 0.;  // double: see forward_row
    for (int64_t j0 = 0; j0 < V; j0 += BLK) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      float* __restrict xb = x + j0;
      float* __restrict yb = y + j0;
      double bphi = 0., bqg = 0.;
#pragma omp simd reduction(+ : bphi, bqg)
      for (int i = 0; i < n; ++i) {
        const float lp = log_prob(xb[i], na), lq = log_prob(yb[i], nb);
        const float q = exp_nonpos(lq);
        float phi, qg;
        div_terms<DIV>(lp, lq, exp_nonpos(lp), q, param, phi, qg);
        bphi += phi;
        bqg += qg;
        xb[i] = qg;
        yb[i] = q;
      }
      sphi += bphi;
      sqg += bqg;
    }
    D = (lognorm_nan(na) || lognorm_nan(nb)) ? NAN : sphi;  // NaN input: q = NaN terms read as 0
    cc = sqg;
  }
  // hard term at T = 1 here: the student's normaliser is that of s
  const float ce = c.hard ? hard_ce(lognorm_from(mb, zb), load_one(s + c.label)) : 0.f;
  a.loss[r] = row_loss(true, a.soft_weight, a.temperature, D, c.hard, a.hard_weight, ce);

  // Last pass: the gradient (hard term at T = 1: softmax(s) = q).
  const float gl = a.grad_loss[r];  // the caller's expected grad_loss (1 unless told)
  const float k_soft = gl * a.soft_weight * a.temperature;
  const float k_hard = c.hard ? gl * a.hard_weight : 0.f;
  const float kp = k_soft / za, kq = (k_soft + k_hard) / zb, inv_zb = 1.0f / zb;
  alignas(64) float gb[BLK];
  const float offa = safe_max(ma), offb = safe_max(mb);
  // online divergences: the stored exponentials of block k are against offs[2k], offs[2k+1];
  // reverse KL: log q - log p - D = d - shift_k with d = (b - offb_k) - (a - offa_k)
  const bool online = DIV == FORWARD_KL || DIV == REVERSE_KL;
  const float lza = online ? std::log(za) : 0.f, lzb = online ? std::log(zb) : 0.f;
  auto block_fb = [&](int64_t k) { return online ? std::exp(offs[2 * k + 1] - offb) : 1.f; };
  auto block_shift = [&](int64_t k) {
    return online ? ((offb - offs[2 * k + 1]) + lzb) - ((offa - offs[2 * k]) + lza) + D : 0.f;
  };
  float cprime = 0.f;  // reverse KL: c' = sum q x from the stored values (kd_math.h)
  if (DIV == REVERSE_KL) {
    double sum = 0.;
    for (int64_t j0 = 0, k = 0; j0 < V; j0 += BLK, ++k) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      const float* __restrict xb = x + j0;
      const float* __restrict yb = y + j0;
      const float inv_zbk = inv_zb * block_fb(k), shift_k = block_shift(k);
      double bs = 0.;
#pragma omp simd reduction(+ : bs)
      for (int i = 0; i < n; ++i) bs += reverse_kl_qx_from_exps(yb[i], xb[i], inv_zbk, shift_k);
      sum += bs;
    }
    cprime = (float)sum;
  }
  for (int64_t j0 = 0, k = 0; j0 < V; j0 += BLK, ++k) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    const float* __restrict xb = x + j0;
    const float* __restrict yb = y + j0;
    const float fa = online ? std::exp(offs[2 * k] - offa) : 1.f, fb = block_fb(k);
    const float kpk = kp * fa, kqk = kq * fb, inv_zbk = inv_zb * fb, shift_k = block_shift(k);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      if (DIV == FORWARD_KL)
        gb[i] = forward_kl_grad_from_exps(xb[i], yb[i], kpk, kqk);
      else if (DIV == REVERSE_KL)
        gb[i] = reverse_kl_grad_from_exps(yb[i], xb[i], inv_zbk, shift_k, cprime, k_soft, k_hard);
      else
        gb[i] = grad_element(k_soft, xb[i], yb[i], cc, k_hard, yb[i], 0.f);
    }
    if (c.hard && c.label >= j0 && c.label < j0 + n) gb[c.label - j0] -= k_hard;
    store_stream(gb, g + j0, n);
  }
}

template <class S>
using FusedFn = void (*)(const RowsArgs&, int64_t, float*, float*, float*);

template <class S>
FusedFn<S> pick_fused(int div) {
  switch (div) {
    case FORWARD_KL: return fused_row<S, FORWARD_KL>;
    case REVERSE_KL: return fused_row<S, REVERSE_KL>;
    case JSD: return fused_row<S, JSD>;
    case SKEW_KL: return fused_row<S, SKEW_KL>;
    case SKEW_REVERSE_KL: return fused_row<S, SKEW_REVERSE_KL>;
    case TVD: return fused_row<S, TVD>;
    default: return nullptr;
  }
}

// Rows are taken chunk by chunk from a shared counter until none is left, so a thread that the
// machine slows down does not hold the others up. Each row is computed by one thread alone, so the
// results do not depend on the thread count or on which thread took a row.
template <class S>
void run_fused(const RowsArgs& a, std::atomic<int64_t>& next, int64_t chunk) {
  FusedFn<S> fn = pick_fused<S>(a.div);
  // Scratch: two fp32 rows and two offsets per block, per call of this function (one call per
  // thread and kernel launch).
  const int64_t row = ((a.V + 15) / 16) * 16, nblk = (a.V + BLK - 1) / BLK;
  std::unique_ptr<float[]> scratch(new float[2 * row + 2 * nblk + 16]);
  float* x = scratch.get();
  x += (16 - (reinterpret_cast<uintptr_t>(x) / sizeof(float)) % 16) % 16;  // 64-byte aligned
  float* y = x + row;
  float* offs = y + row;
  for (;;) {
    const int64_t r0 = next.fetch_add(chunk);
    if (r0 >= a.N) break;
    const int64_t r1 = std::min(a.N, r0 + chunk);
    for (int64_t r = r0; r < r1; ++r) fn(a, r, x, y, offs);
  }
  stream_fence();
}

template <class S>
using RowFn = void (*)(const RowsArgs&, int64_t);

template <class S>
RowFn<S> pick(int div, bool fwd) {
  switch (div) {
    case FORWARD_KL: return fwd ? forward_row<S, FORWARD_KL> : backward_row<S, FORWARD_KL>;
    case REVERSE_KL: return fwd ? forward_row<S, REVERSE_KL> : backward_row<S, REVERSE_KL>;
    case JSD: return fwd ? forward_row<S, JSD> : backward_row<S, JSD>;
    case SKEW_KL: return fwd ? forward_row<S, SKEW_KL> : backward_row<S, SKEW_KL>;
    case SKEW_REVERSE_KL:
      return fwd ? forward_row<S, SKEW_REVERSE_KL> : backward_row<S, SKEW_REVERSE_KL>;
    case TVD: return fwd ? forward_row<S, TVD> : backward_row<S, TVD>;
    default: return nullptr;
  }
}

template <class S>
void run_rows(const RowsArgs& a, int64_t r0, int64_t r1, bool fwd) {
  RowFn<S> fn = pick<S>(a.div, fwd);
  for (int64_t r = r0; r < r1; ++r) fn(a, r);
}

void dispatch(const RowsArgs& a, int64_t r0, int64_t r1, bool fwd) {
  switch (a.dtype) {
    case F32: run_rows<float>(a, r0, r1, fwd); break;
    case BF16: run_rows<bf16_t>(a, r0, r1, fwd); break;
    default: run_rows<f16_t>(a, r0, r1, fwd); break;
  }
}

}  // namespace

void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Fresh multi-MB buffers come from new mmap pages whose first touch dominates the gradient
  // pass; transparent huge pages cut the page faults 512-fold (PyTorch's THP_MEM_ALLOC_ENABLE
  // does the same). Only the 2 MiB-aligned interior is advised; failure is harmless.
  const uintptr_t huge = uintptr_t(1) << 21;
  if (bytes < int64_t(4 * huge)) return;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + uintptr_t(bytes)) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

void populate_pages(void* ptr, int64_t bytes) {
#if defined(__linux__)
  // MADV_POPULATE_WRITE (Linux 5.14) maps and zeroes the pages without a user-space write; older
  // kernels refuse it (EINVAL), and then one store per 4 KiB page faults them in.
  constexpr int kPopulateWrite = 23;
  const uintptr_t page = 4096;
  uintptr_t begin = reinterpret_cast<uintptr_t>(ptr) & ~(page - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(ptr) + uintptr_t(bytes);
  if (bytes <= 0) return;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateWrite) == 0) return;
  volatile char* c = static_cast<volatile char*>(ptr);
  for (int64_t off = 0; off < bytes; off += page) c[off] = 0;
#else
  (void)ptr;
  (void)bytes;
#endif
}

void cpu_forward_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(args, row_begin, row_end, true);
}

void cpu_forward_grad_rows(const RowsArgs& a, std::atomic<int64_t>& next, int64_t chunk) {
  switch (a.dtype) {
    case F32: run_fused<float>(a, next, chunk); break;
    case BF16: run_fused<bf16_t>(a, next, chunk); break;
    default: run_fused<f16_t>(a, next, chunk); break;
  }
}

void cpu_backward_rows(const RowsArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(args, row_begin, row_end, false);
}

}  // namespace kd
