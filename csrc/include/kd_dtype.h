// Block conversion between the input dtypes (fp32, bf16, fp16) and fp32, shared by the C++ CPU
// kernels (csrc/cpu/kd_cpu.cpp, csrc/cpu/sparse_cpu.cpp). Plain C++ (no torch): bf16_t and f16_t
// are the raw 16-bit patterns, the storage torch's BFloat16 and Half use. Loads are exact; stores
// round to nearest even, overflow to inf, and keep NaN a (quiet) NaN. F16C does fp16 eight at a
// time where the build has it (setup.py: -mf16c), the scalar code below is the same conversion.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>

#include "kd_math.h"
#include "kd_rows.h"

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace kd {

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

// ---- scalar conversions ------------------------------------------------------------------------
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
  memcpy(&out, &bits, 4);
  return out;
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

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t b = (uint32_t)float_to_bits(f);
  uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return (uint16_t)(((b & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : r);
}

inline float load_one(const float* p) { return *p; }
inline float load_one(const bf16_t* p) { return bits_to_float((int32_t)p->x << 16); }
inline float load_one(const f16_t* p) { return half_to_float_scalar(p->x); }

// ---- fp32 conversion of one block, times scale -------------------------------------------------
inline void load_scaled(const float* src, float* dst, int n, float scale) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

inline void load_scaled(const bf16_t* src, float* dst, int n, float scale) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = bits_to_float((int32_t)src[i].x << 16) * scale;
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

// The block converted as it is (no scale).
inline void load_block(const float* src, float* dst, int n) { memcpy(dst, src, sizeof(float) * n); }
template <class S>
inline void load_block(const S* src, float* dst, int n) { load_scaled(src, dst, n, 1.0f); }

// ---- block store in the output dtype -----------------------------------------------------------
inline void store(const float* src, float* dst, int n) { memcpy(dst, src, sizeof(float) * n); }

inline void store(const float* src, bf16_t* dst, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i].x = float_to_bf16_bits(src[i]);
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

// One element, rounded like store().
template <class S>
inline S to_dtype(float v) {
  S out;
  store(&v, &out, 1);
  return out;
}

// ---- the runtime dtype code (kd_rows.h DType) as a compile-time storage type -------------------
// f(tag) with tag a value of float, bf16_t or f16_t; returns what f returns.
template <class F>
inline decltype(auto) with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case BF16: return f(bf16_t{});
    case F16: return f(f16_t{});
    default: return f(float{});
  }
}

}  // namespace kd
