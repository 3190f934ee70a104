// Per-row math of DESIGN.md §3, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Everything here is a KD_HD KD_INLINE function on fp32 scalars: __host__ __device__ under nvcc,
// plain inline under a host compiler, where the CPU kernels call them inside `omp simd` loops so
// the compiler vectorizes them (no branches, no libm calls in the per-element functions).
//
// Notation for one row: a = t/T, b = s/T, A = logsumexp(a), B = logsumexp(b), log p = a - A,
// log q = b - B. Every divergence is D = sum_k phi(p_k, q_k); its gradient with respect to b is
// q_j (g_j - c) with g_k = d phi / d q_k and c = sum_k q_k g_k. The kernels only need the product
// q_k g_k ("qg"), which stays finite where q_k = 0.
#pragma once

#include <stdint.h>
#include <math.h>
#include <string.h>

// KD_INLINE: forced inlining (the host vectorizer needs the math inlined into its loops).
#if defined(__CUDACC__)
#define KD_HD __host__ __device__
#define KD_INLINE __forceinline__
#else
#define KD_HD
#define KD_INLINE inline __attribute__((always_inline))
#endif

namespace kd {

// Divergence ids: must equal kdkernels/divergences.py (checked by the tests through
// torch.ops.kdkernels_C.divergence_names()).
enum DivId : int {
  FORWARD_KL = 0,
  REVERSE_KL = 1,
  JSD = 2,
  SKEW_KL = 3,
  SKEW_REVERSE_KL = 4,
  TVD = 5,
  // Logit matching on row-centred logits: no temperature, no softmax. Its kernels are its own
  // (per-element math in kd_mse.h); the switch of kd_switch.h covers the six ids above.
  LOGIT_MSE = 6,
  NUM_DIVERGENCES = 7,
  NUM_SOFTMAX_DIVERGENCES = 6,  // ids [0, 6): the divergences of p = softmax(t/T), q = softmax(s/T)
};

// Names in id order (the registry's names).
static const char* const kDivergenceNames[NUM_DIVERGENCES] = {
    "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "logit_mse"};

// Divergences whose loss accumulates in the statistics pass (no second pass in forward).
KD_HD inline constexpr bool is_online(int div) { return div == FORWARD_KL || div == REVERSE_KL; }

// A state tag of OnlineKL / RawOnlineKL, never a divergence id: the fused reverse KL's numerator
// on fixed centres (cs, ct), acc = sum e^{(s - mb) / T} x with x = (s - cs) - (t - ct) in raw
// logit units, which is only rescaled like zb as the maxima move (no re-centring shift; CUDA
// forward_grad_kernel / cluster_grad_kernel, reverse_kl_fixed_* below).
constexpr int REVERSE_KL_FIXED = -1;
// The states that carry a numerator acc beside the sum-exps.
KD_HD inline constexpr bool has_numerator(int div) { return is_online(div) || div == REVERSE_KL_FIXED; }

// Row statistics saved by forward for backward, fp32 per row: for the teacher (a), the student
// (b) and the student at T = 1 (hard term, s) the max m and log z of a LogNorm, and c.
enum StatsCol : int {
  STAT_MA = 0, STAT_LZA = 1, STAT_MB = 2, STAT_LZB = 3, STAT_C = 4, STAT_MS = 5, STAT_LZS = 6,
  STATS_WIDTH = 7
};

constexpr float kNegInf = -INFINITY;
constexpr float kInf = INFINITY;

// ---- bit casts ---------------------------------------------------------------------------------
KD_HD KD_INLINE float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

KD_HD KD_INLINE int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int32_t, f);
#endif
}

// ---- exp and log ---------------------------------------------------------------------------------
// Branch-free fp32 exp: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (relative
// error about 2 ulp), 2^n built in the exponent bits. exp(-inf) = 0, exp(+inf) = +inf,
// exp(NaN) = NaN; results below 2^-126 flush to 0 (fine for probabilities).
KD_HD KD_INLINE float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx: 2 ulp, flushes like the host version
#else
  const float lo = -87.3365478515625f, hi = 88.37626266479492f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float fn = floorf(xc * 1.44269504088896341f + 0.5f);
  fn = (fn == fn) ? fn : 0.0f;  // NaN: keep the integer path defined, r carries the NaN
  float r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  float scale = bits_to_float(((int32_t)fn + 127) << 23);
  float out = y * scale;
  out = x < lo ? 0.0f : out;
  out = x > 88.72283905206835f ? INFINITY : out;
  return out;
#endif
}

// exp_fast for x <= 0 (x - max of its row), -inf or NaN: no overflow handling, the rounding
// n = round(x / ln2) by the 1.5 * 2^23 shifter instead of floorf (no float -> int conversion), and
// e^r = 1 + r + r^2 Q(r) with Q of degree 4 fitted for relative error on |r| <= ln2/2 (3e-9
// before fp32 rounding; measured 8.1e-8 in fp32 over [-87.3, 0], as exp_fast).
// Inputs below -88 (and -inf) are clamped to -88, where n = -127 makes the scale 2^n exactly 0:
// e^x = 0 for x < -87.68 without a final select; (-87.68, -87.34) gives subnormal values.
KD_HD KD_INLINE float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float lo = -88.0f;
  const float xc = x < lo ? lo : x;  // NaN stays NaN (the comparison is false)
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float kf = xc * 1.44269504088896341f + shifter;
  const float fn = kf - shifter;
  float r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float y = 1.381460577249527e-3f;
  y = y * r + 8.368710987269878e-3f;
  y = y * r + 4.166838899254799e-2f;
  y = y * r + 1.666652113199234e-1f;
  y = y * r + 4.999999403953552e-1f;
  y = y * (r * r) + r + 1.0f;
  // low bits of kf hold n (two's complement, |n| <= 126): 2^n = (n + 127) << 23
  const float scale = bits_to_float((float_to_bits(kf) + 127) << 23);  // n = -127: +0.0
  return y * scale;
#endif
}

// Branch-free fp32 natural log for x >= 0: log(0) = -inf, log(inf) = inf, log(x < 0) = NaN,
// log(NaN) = NaN; denormals handled. Mantissa in [sqrt(1/2), sqrt(2)), degree-9 polynomial.
KD_HD KD_INLINE float log_fast(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  const bool tiny = x < 1.17549435e-38f;
  float xs = tiny ? x * 8388608.0f : x;  // 2^23: bring denormals into the normal range
  int32_t bits = float_to_bits(xs);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  float fe = (float)e - (tiny ? 23.0f : 0.0f);
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float out = m + y + fe * 0.693359375f;
  out = x == 0.0f ? kNegInf : out;
  out = x == INFINITY ? INFINITY : out;
  out = (x < 0.0f || x != x) ? NAN : out;
  return out;
#endif
}

// log_fast for the ratios r > 0 of the linear mixture terms (mix_terms_linear), without the
// fix-ups for subnormals, 0, inf, negative or NaN inputs (the callers select r > 0 and
// r <= 1 / param is finite; a subnormal r reads as if its exponent were -127, off by < 16 in a
// term p log r with p < 2^-126 * m: < 1e-36). The mantissa is brought to [sqrt(1/2), sqrt 2) by
// offsetting the bits by those of sqrt(1/2) (no compare and selects), and log(1 + f) =
// f + f^2 Q(f) with Q of degree 7 fitted for absolute error on [sqrt(1/2) - 1, sqrt 2 - 1]
// (7e-9 before fp32 rounding; log_fast's Cephes form takes degree 9 and two more terms).
// Measured against double log: the same maximum absolute error as log_fast over
// r in [2^-20, 2^20) (5.1e-7 vs 5.0e-7, half an ulp of |log r| ~ 14; 1 ulp near |log r| ~ 0.35),
// in 30% less time (benchmarks/cpu_kernel_ab.cpp: skew KL's fused kernel spent ~40% of its time
// past forward KL's in the log).
KD_HD KD_INLINE float log_ratio_fast(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  const int32_t ix = float_to_bits(x) - 0x3f3504f3;  // bits of sqrt(1/2), rounded down
  const float fe = (float)(ix >> 23);                // arithmetic shift: the exponent k
  const float f = bits_to_float((ix & 0x007fffff) + 0x3f3504f3) - 1.0f;  // [sqrt(1/2), sqrt 2) - 1
  float y = 8.7333716452e-02f;
  y = y * f - 1.4441485703e-01f;
  y = y * f + 1.4979207516e-01f;
  y = y * f - 1.6552385688e-01f;
  y = y * f + 1.9953626394e-01f;
  y = y * f - 2.5002488494e-01f;
  y = y * f + 3.3334225416e-01f;
  y = y * f - 4.9999982119e-01f;
  y = f + (f * f) * y;
  y = y + fe * -2.12194440e-4f;  // k log 2 in two parts: 0.693359375 k is exact
  return y + fe * 0.693359375f;
#endif
}

// 2^x for the CUDA kernels, which fold log2(e) into their per-row scales (one multiply per
// element fewer than e^x, which the device computes as 2^(x log2 e)): ex2.approx on the device
// (--use_fast_math), exp2f on the host, where only the host emulation of those kernels calls it
// (the CPU kernels keep exp_fast / exp_nonpos: a libm call would keep their loops scalar).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
KD_HD KD_INLINE float exp2_dev(float x) { return exp2f(x); }
// log2 x for the same kernels: lg2.approx on the device (__log2f; --use_fast_math), log2f on the host.
KD_HD KD_INLINE float log2_dev(float x) {
#if defined(__CUDA_ARCH__)
  return __log2f(x);
#else
  return log2f(x);
#endif
}

// ---- online (max, sum-exp) -----------------------------------------------------------------------
// A max usable as an exp offset: -inf (an empty or all -inf block) becomes 0, so exp(x - m) = 0.
KD_HD KD_INLINE float safe_max(float m) { return m == kNegInf ? 0.0f : m; }

// Factor that rescales a sum taken against offset m_old to offset m_new >= m_old: of
// e^{(x - m) invT} (invT = 1 / T for raw logits x, the shift first; 1 for sums of e^{x - m}).
KD_HD KD_INLINE float rescale(float m_old, float m_new, float invT = 1.0f) {
  return m_old == kNegInf ? 0.0f : expf((m_old - m_new) * invT);
}

// Merge (m, z) with (m2, z2): z is a sum of exp(x - m) over its part.
KD_HD KD_INLINE void merge_max_sum(float& m, float& z, float m2, float z2) {
  float mn = m > m2 ? m : m2;
  if (m2 != m2) mn = m2;  // NaN propagates
  z = z * rescale(m, mn) + z2 * rescale(m2, mn);
  m = mn;
}

KD_HD KD_INLINE float logsumexp_from(float m, float z) { return m + logf(z); }

// The normaliser of one distribution, log p_i = (x_i - m) - lz, with m and lz kept apart: x - m is
// exact near the maximum (Sterbenz), so no rounding of m + log z (half an ulp of m: ~5e-4 at
// |x| ~ 1e4) enters the log-probabilities of the likely tokens.
struct LogNorm {
  float m, lz;
};
KD_HD KD_INLINE LogNorm lognorm_from(float m, float z) { return LogNorm{safe_max(m), logf(z)}; }
KD_HD KD_INLINE float log_prob(float x, LogNorm n) { return (x - n.m) - n.lz; }
// The same with m in raw logit units (RawOnlineKL), shift first: (x - m) / T - log z.
KD_HD KD_INLINE float log_prob_scaled(float x, LogNorm n, float invT) {
  return (x - n.m) * invT - n.lz;
}
KD_HD KD_INLINE bool lognorm_nan(LogNorm n) { return n.m != n.m || n.lz != n.lz; }

// The +inf-loss gradient rule (docs/precision.md): a row's gradient is finite in every element or
// NaN in every element. c = sum_k q_k g_k (or reverse KL's c') is infinite exactly when a term of
// the gradient is (reverse KL with p = 0 < q: infinity minus infinity); the kernels then write NaN
// over the whole row. False for +-inf and NaN.
KD_HD KD_INLINE bool grad_defined(float c) { return c - c == 0.0f; }

// log(w1 e^x + (1 - w1) e^y) for log-probabilities x, y, formed as hi + log(w_hi + w_lo e^(lo-hi)):
// the mixture never underflows in linear space (both probabilities tiny, or a weight of 0: then
// it is exactly the other distribution), identical x == y give exactly x, NaN stays NaN, and
// both -inf give -inf.
// A tiny w_hi (a parameter near 0 or 1, down to 2^-126) next to a w_lo e^(lo-hi) of its size,
// far below 2^-126 where exp flushes to 0, is summed scaled by 2^64 and the log shifted back
// (found by the fuzzer: skew reverse KL with alpha = 2^-126 lost up to log 2 per element). Only
// then: the shift costs ~ulp(44) absolute, harmless next to |log m - hi| > 41 there but not
// for the ordinary case, where e^(lo-hi) is normal and the plain sum is exact enough.
// MixParts holds the two scaled terms u_hi = w_hi 2^k, u_lo = w_lo e^(lo-hi) 2^k (k = 0 or 64) of
// the sum, so that the shares of x and y in m (w1 e^x / m, (1 - w1) e^y / m) are u / (u_hi + u_lo):
// one division, where exp(log w + x - log m) took an exp and a per-call log w.
struct MixParts {
  float hi, lo, uhi, ulo, shift, whi, ed;  // ed = e^(lo - hi + shift)
  bool xhi;  // x is the larger
};
KD_HD KD_INLINE MixParts mix_parts(float w1, float x, float y) {
  MixParts m;
  const float w2 = 1.0f - w1;
  m.xhi = x >= y;
  m.hi = m.xhi ? x : y;
  m.lo = m.xhi ? y : x;
  m.whi = m.xhi ? w1 : w2;
  const float wlo = m.xhi ? w2 : w1;
  const float d = m.lo - safe_max(m.hi);                       // <= 0, or NaN
  const bool scaled = m.whi < 8.67361738e-19f && d < -80.0f;  // w_hi < 2^-60, e^d < 2^-115
  m.shift = scaled ? 44.3614195558365f : 0.0f;                 // 64 ln 2
  m.uhi = scaled ? m.whi * 1.8446744e19f : m.whi;
  m.ed = exp_nonpos(d + m.shift);
  m.ulo = wlo * m.ed;
  return m;
}
KD_HD KD_INLINE float log_mix_from(const MixParts& m) {
  const float out = m.hi + (log_fast(m.uhi + m.ulo) - m.shift);
  return m.whi == 0.0f ? m.lo : out;
}
KD_HD KD_INLINE float log_mix(float w1, float x, float y) { return log_mix_from(mix_parts(w1, x, y)); }

// The share of x (of_x) or of y in the mixture m of mix_parts, given logm = log_mix_from(m):
// 0 where m = 0; where the sum underflows (w_hi = 0 and e^(lo-hi) = 0) the lower one is all of m.
KD_HD KD_INLINE float mix_share(const MixParts& m, float logm, bool of_x) {
  const float sum = m.uhi + m.ulo;
  const bool is_hi = of_x == m.xhi;
  const float u = is_hi ? m.uhi : m.ulo;
  const float share = sum > 0.0f ? u / sum : (is_hi ? 0.0f : 1.0f);
  return logm == kNegInf ? 0.0f : share;
}

// ---- per-element divergence terms ------------------------------------------------------------
// x (log x - log y) with 0 log 0 = 0 (also when log y = -inf).
KD_HD KD_INLINE float xlogr(float x, float logx, float logy) {
  return x > 0.0f ? x * (logx - logy) : 0.0f;
}

// phi(p, q) and qg = q * d phi / d q for one element, given log p, log q (p = e^{log p}, ...).
// `param` is beta for jsd, alpha for the skew divergences. Never NaN for finite log p, log q or
// -inf ones; both probabilities underflowing to 0 give phi = qg = 0. No libm call: the host
// kernels call this inside `omp simd` loops, which a libm call keeps scalar (a per-element logf
// of the mixture weight made skew KL 20x slower than forward KL on the CPU backend).
template <int DIV>
KD_HD KD_INLINE void div_terms(float logp, float logq, float p, float q, float param, float& phi,
                               float& qg) {
  if (DIV == FORWARD_KL) {
    phi = xlogr(p, logp, logq);
    qg = -p;  // q * (-p / q)
  } else if (DIV == REVERSE_KL) {
    phi = xlogr(q, logq, logp);
    qg = q > 0.0f ? q * (logq - logp + 1.0f) : 0.0f;
  } else if (DIV == JSD) {
    const float beta = param;
    const float logm = log_mix(beta, logp, logq);
    phi = beta * xlogr(p, logp, logm) + (1.0f - beta) * xlogr(q, logq, logm);
    qg = (1.0f - beta) * xlogr(q, logq, logm);
  } else if (DIV == SKEW_KL) {
    // m = alpha p + (1 - alpha) q; q g = -(1 - alpha) p q / m = -p * (share of q in m)
    const MixParts mp = mix_parts(param, logp, logq);
    const float logm = log_mix_from(mp);
    phi = xlogr(p, logp, logm);
    qg = -p * mix_share(mp, logm, false);
  } else if (DIV == SKEW_REVERSE_KL) {
    // m = alpha q + (1 - alpha) p; q g = q (log q - log m + 1 - alpha q / m)
    const MixParts mp = mix_parts(param, logq, logp);
    const float logm = log_mix_from(mp);
    phi = xlogr(q, logq, logm);
    qg = q == 0.0f ? 0.0f : q * (logq - logm + 1.0f - mix_share(mp, logm, true));
  } else {  // TVD
    phi = 0.5f * fabsf(p - q);
    // 0.5 q sign(q - p) by selects, the same values (NaN q stays NaN; sign0 as an int select and a
    // conversion cost the CUDA gradient pass ~2 instructions per element)
    const float d = q - p, h = 0.5f * q;
    qg = d > 0.0f ? h : (d < 0.0f ? -h : h * 0.0f);
  }
}

// div_terms of the mixture divergences (jsd, skew KL, skew reverse KL) from log p and log q alone,
// returning q: p and q are e^hi and e^hi e^(lo - hi), the latter from the mixture's own
// exponential (one exp fewer than e^{log p} and e^{log q} apart; ~1 ulp more rounding in the
// smaller one, and values below 2^-126 may come out subnormal instead of 0).
template <int DIV>
KD_HD KD_INLINE float mix_div_terms(float logp, float logq, float param, float& phi, float& qg) {
  const bool rev = DIV == SKEW_REVERSE_KL;  // its mixture weights q by param
  const MixParts mp = mix_parts(param, rev ? logq : logp, rev ? logp : logq);
  const float ehi = exp_nonpos(mp.hi);
  const float elo = ehi * (mp.ed * (mp.shift != 0.0f ? 5.42101086e-20f : 1.0f));  // * 2^-64
  const bool p_hi = rev ? !mp.xhi : mp.xhi;
  const float p = p_hi ? ehi : elo, q = p_hi ? elo : ehi;
  div_terms<DIV>(logp, logq, p, q, param, phi, qg);
  return q;
}

// The mixture divergences from p and q themselves (the CPU fused kernel keeps the row's
// exponentials from its statistics pass): one division and one log per element (two logs for
// JSD), where the log-space form above takes two exponentials, a log and a division.
// m = lo + w (hi - lo) is exactly q (p) when p == q, so identical rows still give exactly 0
// (the caller rounds p and q before this, so no FMA contracts them into m). Only for parameters
// with mix_linear_ok: an m that underflows to 0 (or a subnormal) while p or q does not needs
// p or q below 2^-149 / param <= 2^-89, and such an element's term is then below 2^-89 log 2^60
// (~1e-25): taken as 0. Elsewhere the ratios p/m, q/m are bounded by 1/param and carry a few ulps,
// so log(p/m) is off by ~3e-7 absolute, well inside the error bound (docs/precision.md).
KD_HD KD_INLINE bool mix_linear_ok(float param) { return param >= 8.67361738e-19f; }  // 2^-60

KD_HD KD_INLINE float xlog_of_ratio(float x, float r, float logr) {
  return r > 0.0f ? x * logr : 0.0f;  // r > 0 implies x > 0 (r = x / m)
}

// x / m for the linear terms (m = 0: x = 0 too, the divisor is taken as 1). The host's IEEE
// division gives exactly 1 for x == m (identical rows: exact 0 terms); the device build's fast
// division (--use_fast_math: x times an approximate reciprocal) need not, so there x == m is
// selected. (On the host a select around the division defeats GCC's vectorizer.)
KD_HD KD_INLINE float mix_ratio(float x, float m) {
#if defined(__CUDA_ARCH__)
  return x == m ? 1.0f : x / (m > 0.0f ? m : 1.0f);
#else
  return x / (m > 0.0f ? m : 1.0f);
#endif
}

// jsd's terms for the CUDA kernels, which form p = 2^lp2 and q = 2^lq2 themselves (Prob2): with
// m = beta p + (1 - beta) q, log(p/m) = (lp2 - log2 m) ln 2 and log(q/m) alike: one log per
// element, where mix_terms_linear takes a reciprocal and two logs (5 -> 3 MUFU an element with the
// two exponentials). The differences cancel the size of |log2 p|: ~2 ulp of it, weighted by p,
// so the sum's error is ~1.2e-7 H(p) (H <= ln V: below the loss floor of docs/precision.md, 4 ulps
// of T^2 (1 + ln V)); the ratio form's is ~5e-7 Sum p. Branch-free, with one select: p == q
// (identical rows) takes log2 m = lq2, so identical rows give exactly 0 as mix_ratio's ratio of 1
// does; a -inf lp2 or lq2 (a -inf logit: p or q = 0) is raised to -256 first, so its term is
// 0 * finite (also when both are -inf);
// m = 0 (p, q below 2^-89 when beta >= 2^-60: mix_linear_ok) reads as m = 2^-126, terms ~1e-25.
// Returns the terms tp = p log2(p/m), tq = q log2(q/m): phi = beta ln2 tp + (1 - beta) ln2 tq,
// q g = (1 - beta) ln2 tq (the caller folds the constants into its per-row factors).
KD_HD KD_INLINE void jsd_terms_log2(float p, float q, float lp2, float lq2, float beta, float& tp, float& tq) {
  const float m = q + beta * (p - q);
  const float lpc = fmaxf(lp2, -256.0f), lqc = fmaxf(lq2, -256.0f);
  const float lm2 = p == q ? lqc : log2_dev(fmaxf(m, 1.17549435e-38f));
  tp = p * (lpc - lm2);
  tq = q * (lqc - lm2);
}

template <int DIV>
KD_HD KD_INLINE void mix_terms_linear(float p, float q, float param, float& phi, float& qg) {
  if (DIV == JSD) {  // m = beta p + (1 - beta) q
    const float m = q + param * (p - q);  // m = 0: p = q = 0 (or below 2^-89: terms ~ 0)
    const float rp = mix_ratio(p, m), rq = mix_ratio(q, m);
    const float tq = xlog_of_ratio(q, rq, log_ratio_fast(rq));
    phi = param * xlog_of_ratio(p, rp, log_ratio_fast(rp)) + (1.0f - param) * tq;
    qg = (1.0f - param) * tq;
  } else if (DIV == SKEW_KL) {  // m = alpha p + (1 - alpha) q; q g = -(1 - alpha) q p / m
    const float m = q + param * (p - q);
    const float r = mix_ratio(p, m);
    phi = xlog_of_ratio(p, r, log_ratio_fast(r));
    qg = -(1.0f - param) * q * r;
  } else {  // SKEW_REVERSE_KL: m = alpha q + (1 - alpha) p; q g = q (log(q/m) + 1 - alpha q / m)
    const float m = p + param * (q - p);
    const float r = mix_ratio(q, m);
    const float lr = log_ratio_fast(r);
    phi = r > 0.0f ? q * lr : 0.0f;
    qg = r > 0.0f ? q * ((lr + 1.0f) - param * r) : 0.0f;
  }
}

// Gradient with respect to the student logits s of one element:
//   k_soft * (qg - q c) + k_hard * (softmax(s) - [j = label]),
// with k_soft = grad_loss * soft_weight * T and k_hard = grad_loss * hard_weight.
// Reverse KL: d/db_j = q_j (log q_j - log p_j - D) = q_j (x_j - D) with x_j = (b_j - a_j) - k for
// the centred scaled logits a_j = (t_j - ma) / T, b_j = (s_j - mb) / T and the per-row constant
// k = lzb - lza formed in double, so each element rounds once instead of cancelling terms of
// size |b| (|logits| ~ 1e4).
KD_HD KD_INLINE float reverse_kl_offset(float lza, float lzb) {
  return (float)((double)lzb - (double)lza);
}

KD_HD KD_INLINE float grad_element(float k_soft, float qg, float q, float c, float k_hard, float sm,
                                float onehot) {
  return k_soft * (qg - q * c) + k_hard * (sm - onehot);
}

// Fused forward+gradient (kernel keeps the row's exponentials): the gradient of one element
// from stored values, for grad_loss = 1.
// Forward KL from the exponentials ea = e^{a - ma}, eb = e^{b - mb}: k_soft (q - p) + k_hard q
// = eb * kq - ea * kp with kq = (k_soft + k_hard) / zb and kp = k_soft / za (per block, times
// the block's rescale factors), formed with the larger factor outside: kq (eb - ea r) with
// r = kp / kq, |r| <= 1, or kp (eb r - ea) with r = kq / kp, |r| < 1. Rows with p == q
// (teacher = student + a constant) have kp == kq, r = 1 and an exactly zero gradient, where
// eb kq - ea kp would be contracted into an FMA that keeps the rounding of one product (~1 ulp
// of p k); |r| <= 1 never overflows (a block's factors may be far apart).
KD_HD KD_INLINE float forward_kl_grad_q_major(float ea, float eb, float r, float kq) {
  return kq * (eb - ea * r);
}
KD_HD KD_INLINE float forward_kl_grad_p_major(float ea, float eb, float r, float kp) {
  return kp * (eb * r - ea);
}

// Reverse KL from eb = e^{b - mb} and d = (b - mb) - (a - ma): q (k_soft (x - c') + k_hard) with
// q = eb * inv_zb, x = d - shift = log q - log p - D (shift = (B - mb) - (A - ma) + D), and
// c' = sum_k q_k x_k summed by the kernel from these very x_k (exactly 0 but for rounding): for
// near one-hot rows at |logits| ~ 1e4 the rounding of the dominant x_j then cancels in x_j - c'
// (as in backward_row). Zero where q = 0.
KD_HD KD_INLINE float reverse_kl_qx_from_exps(float eb, float d, float inv_zb, float shift) {
  return eb > 0.0f ? eb * inv_zb * (d - shift) : 0.0f;
}
KD_HD KD_INLINE float reverse_kl_grad_from_exps(float eb, float d, float inv_zb, float shift,
                                                float cprime, float k_soft, float k_hard) {
  return eb > 0.0f ? eb * inv_zb * (k_soft * ((d - shift) - cprime) + k_hard) : 0.0f;
}

// Hard cross-entropy term: logsumexp(s) - s[label] (T = 1).
KD_HD KD_INLINE float hard_ce(LogNorm ns, float s_label) { return (ns.m - s_label) + ns.lz; }

// One row's loss: soft_weight T^2 D (when the soft term counts) + hard_weight ce (when the hard
// term counts; the caller forms ce only then, since the label may be out of range otherwise).
KD_HD KD_INLINE float row_loss(bool soft, float soft_weight, float T, float D, bool hard,
                               float hard_weight, float ce) {
  float loss = soft ? soft_weight * T * T * D : 0.0f;
  if (hard) loss += hard_weight * ce;
  return loss;
}

// The per-row statistics forward saves for backward (StatsCol layout), all zero for ignored rows.
struct RowStats {
  LogNorm na, nb;  // teacher a = t/T, student b = s/T
  float c;         // sum_k q_k g_k
  LogNorm ns;      // student at T = 1 (hard term)
};
KD_HD KD_INLINE void store_row_stats(float* st, const RowStats& rs) {
  st[STAT_MA] = rs.na.m;
  st[STAT_LZA] = rs.na.lz;
  st[STAT_MB] = rs.nb.m;
  st[STAT_LZB] = rs.nb.lz;
  st[STAT_C] = rs.c;
  st[STAT_MS] = rs.ns.m;
  st[STAT_LZS] = rs.ns.lz;
}
KD_HD KD_INLINE RowStats load_row_stats(const float* st) {
  return RowStats{LogNorm{st[STAT_MA], st[STAT_LZA]}, LogNorm{st[STAT_MB], st[STAT_LZB]},
                  st[STAT_C], LogNorm{st[STAT_MS], st[STAT_LZS]}};
}

// ---- online forward / reverse KL on centred logits (DESIGN.md §3, step 1) -----------------------
// The running maximum after seeing x: keeps a NaN already in m (as the CPU kernels always did).
KD_HD KD_INLINE float raise_max(float m, float x) { return x > m ? x : m; }

// One element's share of the online KL numerator, against the offsets offa = safe_max(ma),
// offb = safe_max(mb) and with ea = e^{a - offa}, eb = e^{b - offb}:
//   forward KL: e^{a - ma}((a - ma) - (b - mb)),   reverse KL: e^{b - mb}((b - mb) - (a - ma)).
// Centred terms stay small (|a - ma| is not |a| ~ 1e4 / T), so one-hot rows at |logits| ~ 1e4 or
// T ~ 0.05 keep their precision; a zero weight gives 0 (also where the other logit is -inf).
template <int DIV>
KD_HD KD_INLINE float online_kl_term(float a, float b, float offa, float offb, float ea, float eb) {
  if (DIV == FORWARD_KL) return ea > 0.0f ? ea * ((a - offa) - (b - offb)) : 0.0f;
  if (DIV == REVERSE_KL) return eb > 0.0f ? eb * ((b - offb) - (a - offa)) : 0.0f;
  return 0.0f;
}

// A numerator acc taken against offsets (offa_i, offb_i), re-centred on offsets (offa, offb) no
// smaller: da = offa_i - offa <= 0, db = offb_i - offb <= 0, ra = e^{ma_i - ma}, rb = e^{mb_i - mb}
// (rescale()), za, zb the sums that go with acc. Every old term gains (da - db) (forward KL;
// (db - da) reverse KL) before the usual rescaling:
//   forward KL: ra (acc + za (da - db)),   reverse KL: rb (acc + zb (db - da)).
// An empty part (weight za = 0, resp. zb = 0; then acc = 0 too) gives exactly 0, never inf * 0.
// A part whose acc is +inf (reverse KL: a -inf teacher logit under student mass; forward KL the
// reverse) stays +inf where its factor underflows to 0 (at T = 0.05 a part whose maximum is 10
// below the row's has the factor e^-200): its true weight is positive, and inf * 0 made the row
// NaN (forward_kernel's merge of the threads' parts; test_regressions.py::
// test_infinite_row_stays_infinite_when_lane_weights_underflow; Triton's lane_term).
KD_HD KD_INLINE float inf_kept_times(float x, float f) { return x == kInf ? x : x * f; }
template <int DIV>
KD_HD KD_INLINE float online_kl_recentre(float acc, float za, float zb, float da, float db,
                                         float ra, float rb) {
  if (DIV == FORWARD_KL) return inf_kept_times(acc + (za == 0.0f ? 0.0f : za * (da - db)), ra);
  if (DIV == REVERSE_KL) return inf_kept_times(acc + (zb == 0.0f ? 0.0f : zb * (db - da)), rb);
  if (DIV == REVERSE_KL_FIXED) return inf_kept_times(acc, rb);  // x does not depend on the maxima
  return 0.0f;
}

// log(num / den) for the positive sums of the online KL loss. Host: logf of the ratio. CUDA
// (built with --use_fast_math, where logf is __logf, absolute error ~4e-7 near 1): log1pf of
// (num - den) / den, exact subtraction (Sterbenz) for a ratio in [0.5, 2], logf elsewhere; so a
// small divergence times T^2 (T = 50: 2500) does not carry the intrinsic's error.
KD_HD KD_INLINE float log_ratio(float num, float den) {
#if defined(__CUDA_ARCH__)
  const float r = num / den;
  return (r >= 0.5f && r <= 2.0f) ? log1pf((num - den) / den) : logf(r);
#else
  return logf(num / den);
#endif
}

// Online state of one row part (a V-block, a CUDA thread's strided share, a warp, a CTA):
// (ma, za) and (mb, zb) the (max, sum-exp) of a = t/T and b = s/T, and for forward / reverse KL
// the numerator acc = sum online_kl_term(...) centred on the part's own maxima (through
// safe_max: an empty part, m = -inf, z = 0, acc = 0). Other divergences ignore acc.
// The loss is D = acc / za + log(zb / za) (forward KL) or acc / zb + log(za / zb) (reverse KL):
// one log of a ratio near 1, no cancelling log-sums of size log V.
template <int DIV>
struct OnlineKL {
  float ma, za, mb, zb, acc;

  KD_HD KD_INLINE void init() {
    ma = kNegInf;
    mb = kNegInf;
    za = 0.0f;
    zb = 0.0f;
    acc = 0.0f;
  }

  // Absorb sums (za2, zb2, acc2) taken against new maxima (na, nb), na >= ma, nb >= mb (from
  // raise_max): the state is re-centred on (na, nb) and the sums added. This is merge() with a
  // part already centred on the merged maxima (its factors are 1): the per-block update.
  KD_HD KD_INLINE void absorb(float na, float nb, float za2, float zb2, float acc2) {
    const float ra = rescale(ma, na), rb = rescale(mb, nb);
    if (has_numerator(DIV))
      acc = online_kl_recentre<DIV>(acc, za, zb, safe_max(ma) - safe_max(na),
                                    safe_max(mb) - safe_max(nb), ra, rb) + acc2;
    za = za * ra + za2;
    zb = zb * rb + zb2;
    ma = na;
    mb = nb;
  }

  // Merge another partial state (any maxima; either may be empty).
  KD_HD KD_INLINE void merge(const OnlineKL& o) {
    const float na = raise_max(ma, o.ma), nb = raise_max(mb, o.mb);
    const float ra = rescale(o.ma, na), rb = rescale(o.mb, nb);
    const float acc2 = has_numerator(DIV) ? online_kl_recentre<DIV>(o.acc, o.za, o.zb,
                                                                safe_max(o.ma) - safe_max(na),
                                                                safe_max(o.mb) - safe_max(nb),
                                                                ra, rb)
                                      : 0.0f;
    absorb(na, nb, o.za * ra, o.zb * rb, acc2);
  }

  // The divergence of the whole row (forward / reverse KL only).
  KD_HD KD_INLINE float divergence() const {
    return DIV == FORWARD_KL ? acc / za + log_ratio(zb, za) : acc / zb + log_ratio(za, zb);
  }
};

// Reverse KL gradient term q_j (x_j - c') with x_j = (b_j - a_j) - k, k = reverse_kl_offset(lza, lzb),
// and c' = sum_k q_k x_k summed by the kernel from the same rounded x_k (reverse_kl_qx) in a pass
// before the gradient: for near one-hot rows at |logits| ~ 1e4 the rounding of the dominant x_j
// then cancels in x_j - c' (as in autograd) instead of leaving ulp(1e4)-sized errors. 0 where q = 0.
KD_HD KD_INLINE float reverse_kl_qx(float q, float a, float b, float k) {
  return q == 0.0f ? 0.0f : q * ((b - a) - k);
}
KD_HD KD_INLINE float reverse_kl_qg(float q, float a, float b, float k, float cprime) {
  return q == 0.0f ? 0.0f : q * (((b - a) - k) - cprime);
}

// Reverse KL on fixed centres (REVERSE_KL_FIXED; the CUDA training kernels, as Triton's fused
// kd_fwd_grad_kernel). x = (s - cs) - (t - ct) in raw logit units, one rounding per element
// whatever the maxima, and c = E_q[x] = acc / zb summed from these x; then
//   log q - log p = (x - ((mb - cs) - (ma - ct))) / T + log(za / zb),
//   D = (c - ((mb - cs) - (ma - ct))) / T + log(za / zb),   d/db_j = q_j (x_j - c) / T,
// so the gradient subtracts c from the very x it was summed from: the dominant terms of a near
// one-hot row at |logits| ~ 1e4 cancel exactly (the two-kernel path sums a c' pass for that). The
// rounding of x grows with the centres' distance from the likely tokens: a row whose centres lie
// farther than kFarCentres (units of T, |mb - cs| + |ma - ct|) from its maxima re-centres on the
// maxima and sums c once more from the gradient's own q (docs/precision.md).
constexpr float kFarCentres = 16.0f;
KD_HD KD_INLINE float reverse_kl_x(float s, float t, float cs, float ct) { return (s - cs) - (t - ct); }
// One element's share of acc (eb = e^{(s - mb) / T} against the running maximum; 0 where eb = 0).
KD_HD KD_INLINE float reverse_kl_fixed_term(float eb, float x) { return eb > 0.0f ? eb * x : 0.0f; }
KD_HD KD_INLINE bool reverse_kl_centres_far(float ma, float mb, float cs, float ct, float invT) {
  return (fabsf(mb - cs) + fabsf(ma - ct)) * invT > kFarCentres;
}
KD_HD KD_INLINE float reverse_kl_fixed_divergence(float c, float ma, float mb, float cs, float ct, float invT,
                                                  float za, float zb) {
  return (c - ((mb - cs) - (ma - ct))) * invT + log_ratio(za, zb);
}
// q_j (x_j - c) / T, 0 where q = 0.
KD_HD KD_INLINE float reverse_kl_fixed_qg(float q, float x, float c, float invT) {
  return q == 0.0f ? 0.0f : q * ((x - c) * invT);
}

// OnlineKL (sum-exps za, zb and the centred online KL numerator acc, its recentring and
// divergence) with the maxima ma, mb in RAW logit units (of t and s): every exponent and every
// recentring shift is (m_old - m_new) / T, the difference taken first, so that x - m is exact
// near the maximum at any T (scaling first rounds t / T: ulp(2e5) = 0.016 at |t| = 1e4,
// T = 0.05, which moved a near-tie teacher's mass enough to change a forward KL of 2.4e5 by
// 700; test_regressions.py). The CUDA kernels and the C++ CPU kernels (kd_cpu.cpp) use it.
template <int DIV>
struct RawOnlineKL {
  OnlineKL<DIV> k;  // k.ma, k.mb: running maxima of t and s
  float invT;

  KD_HD KD_INLINE void init(float inv_t) {
    k.init();
    invT = inv_t;
  }
  KD_HD KD_INLINE float factor(float m_old, float m_new) const { return rescale(m_old, m_new, invT); }
  // Re-centre on raw maxima na >= ma, nb >= mb and add sums taken against them.
  KD_HD KD_INLINE void absorb(float na, float nb, float za2, float zb2, float acc2) {
    const float ra = factor(k.ma, na), rb = factor(k.mb, nb);
    if (has_numerator(DIV))
      k.acc = online_kl_recentre<DIV>(k.acc, k.za, k.zb, (safe_max(k.ma) - safe_max(na)) * invT,
                                      (safe_max(k.mb) - safe_max(nb)) * invT, ra, rb) + acc2;
    k.za = k.za * ra + za2;
    k.zb = k.zb * rb + zb2;
    k.ma = na;
    k.mb = nb;
  }
};

}  // namespace kd
