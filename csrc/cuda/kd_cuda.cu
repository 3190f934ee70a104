// CUDA row kernels: one CTA per row. Same passes and the same per-element math (kd_math.h) as the
// CPU kernels: forward = statistics pass (online (max, sum-exp) of t/T, s/T and s, with forward /
// reverse KL accumulated online) + a second pass for the other divergences; backward recomputes
// p and q from the saved per-row (A, B, c, S) and writes the gradient.
//
// Loads are 16-byte vectors when the row start is 16-byte aligned (always true for contiguous
// rows whose V is a multiple of 16 / sizeof(element)), scalar otherwise and in the tail.
// Reductions: warp shuffles, then one value per warp through shared memory. Offsets are int64.
// No torch headers: the binding lives in bindings_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kd_cuda.h"
#include "kd_math.h"

// Kernel launch: triple chevrons under nvcc; the host emulation (csrc/testing/cuda_emu.h, tests
// only) defines KD_LAUNCH to run the same kernel on the CPU.
#ifndef KD_LAUNCH
#define KD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace kd {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class S> __device__ __forceinline__ S from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <class S>
struct Vec {
  static constexpr int N = 16 / sizeof(S);
};

// Load elements [j, j + N) of a row into fp32 (vector load when `vec`, else bounded scalar loads;
// out-of-range lanes get -inf so they carry no probability).
template <class S>
__device__ __forceinline__ void load_chunk(const S* row, int64_t j, int64_t V, bool vec, float* out) {
  constexpr int N = Vec<S>::N;
  if (vec && j + N <= V) {
    uint4 raw = *reinterpret_cast<const uint4*>(row + j);
    const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = j + k < V ? to_float(row[j + k]) : kNegInf;
  }
}

template <class S>
__device__ __forceinline__ void store_chunk(S* row, int64_t j, int64_t V, bool vec, const float* in) {
  constexpr int N = Vec<S>::N;
  if (vec && j + N <= V) {
    uint4 raw;
    S* e = reinterpret_cast<S*>(&raw);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<S>(in[k]);
    *reinterpret_cast<uint4*>(row + j) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (j + k < V) row[j + k] = from_float<S>(in[k]);
  }
}

// Partial row states and their merges. The soft term's state is kd_math.h's OnlineKL (teacher and
// student (max, sum-exp), and the centred online KL numerator: the code the CPU kernels run);
// the hard term's is a plain (max, sum-exp) pair.
struct MaxSum {
  float m, z;
  __device__ __forceinline__ void init() { m = kNegInf; z = 0.f; }
  __device__ __forceinline__ void merge(const MaxSum& o) { merge_max_sum(m, z, o.m, o.z); }
};

__device__ __forceinline__ MaxSum shfl_xor(const MaxSum& x, int off) {
  return MaxSum{__shfl_xor_sync(0xffffffffu, x.m, off), __shfl_xor_sync(0xffffffffu, x.z, off)};
}

template <int DIV>
__device__ __forceinline__ OnlineKL<DIV> shfl_xor(const OnlineKL<DIV>& x, int off) {
  OnlineKL<DIV> o;
  o.ma = __shfl_xor_sync(0xffffffffu, x.ma, off);
  o.za = __shfl_xor_sync(0xffffffffu, x.za, off);
  o.mb = __shfl_xor_sync(0xffffffffu, x.mb, off);
  o.zb = __shfl_xor_sync(0xffffffffu, x.zb, off);
  o.acc = is_online(DIV) ? __shfl_xor_sync(0xffffffffu, x.acc, off) : 0.f;
  return o;
}

template <class State>
__device__ __forceinline__ void warp_merge(State& st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st.merge(shfl_xor(st, off));
}

// Merge the per-thread states of the CTA; every thread gets the result. `sm`: WARPS states.
template <class State>
__device__ void block_merge(State& st, State* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_merge(st);
  __syncthreads();
  if (lane == 0) sm[warp] = st;
  __syncthreads();
  st = sm[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) st.merge(sm[w]);
}

__device__ float block_sum(float x, float* sm /* [WARPS] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  __syncthreads();
  if (lane == 0) sm[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < WARPS; ++w) total += sm[w];
  return total;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <class S, int DIV>
__global__ void __launch_bounds__(THREADS) forward_kernel(RowsArgs a) {
  constexpr int N = Vec<S>::N;
  __shared__ float sm[sizeof(OnlineKL<DIV>) / sizeof(float) * WARPS];  // block reductions
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t label = a.labels ? a.labels[r] : 0;
  const bool ignored = a.labels && label == a.ignore_index;
  float* st = a.stats + r * STATS_WIDTH;
  if (ignored) {
    if (threadIdx.x == 0) {
      a.loss[r] = 0.f;
      for (int k = 0; k < STATS_WIDTH; ++k) st[k] = 0.f;
    }
    return;
  }
  const bool soft = a.soft_weight != 0.f;
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool bad_label = hard && (label < 0 || label >= a.V);
  const bool sep = hard && !(soft && a.temperature == 1.f);
  const S* s = static_cast<const S*>(a.student) + (r / a.L) * a.s_stride_b + (r % a.L) * a.s_stride_l;
  const S* t = static_cast<const S*>(a.teacher) + (r / a.t_L) * a.t_stride_b + (r % a.t_L) * a.t_stride_l;
  const bool vec = aligned16(s) && aligned16(t);
  const float invT = 1.0f / a.temperature;
  const int64_t V = a.V;

  // Per thread: each chunk's sums are taken against the raised running maxima and absorbed
  // (OnlineKL::absorb, as the CPU kernel does per block); then warp and CTA merges.
  OnlineKL<DIV> on;
  MaxSum os;
  on.init();
  os.init();
  for (int64_t j = (int64_t)threadIdx.x * N; j < V; j += (int64_t)THREADS * N) {
    float sv[N], tv[N];
    load_chunk(s, j, V, vec, sv);
    if (soft) {
      load_chunk(t, j, V, vec, tv);
      float bma = kNegInf, bmb = kNegInf;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        tv[k] *= invT;
        bma = fmaxf(bma, tv[k]);
        bmb = fmaxf(bmb, sv[k] * invT);
      }
      const float nma = raise_max(on.ma, bma), nmb = raise_max(on.mb, bmb);
      const float offa = safe_max(nma), offb = safe_max(nmb);
      // The chunk's sums against the raised maxima, absorbed (OnlineKL::absorb). For forward /
      // reverse KL the state is re-centred first and the terms added into it: the same sums, and
      // fewer live registers (ptxas) than three chunk-local sums.
      float za = 0.f, zb = 0.f;
      if (is_online(DIV)) on.absorb(nma, nmb, 0.f, 0.f, 0.f);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float av = tv[k], bv = sv[k] * invT;
        const float ea = exp_fast(av - offa), eb = exp_fast(bv - offb);
        if (is_online(DIV)) {
          on.za += ea;
          on.zb += eb;
          on.acc += online_kl_term<DIV>(av, bv, offa, offb, ea, eb);
        } else {
          za += ea;
          zb += eb;
        }
      }
      if (!is_online(DIV)) on.absorb(nma, nmb, za, zb, 0.f);
    }
    if (sep) {
      float bm = kNegInf;
#pragma unroll
      for (int k = 0; k < N; ++k) bm = fmaxf(bm, sv[k]);
      const float nm = raise_max(os.m, bm);
      os.z *= rescale(os.m, nm);
      os.m = nm;
      const float off = safe_max(nm);
#pragma unroll
      for (int k = 0; k < N; ++k) os.z += exp_fast(sv[k] - off);
    }
  }
  LogNorm na{0.f, 0.f}, nb{0.f, 0.f};
  float cc = 0.f, D = 0.f;
  if (soft) {
    block_merge(on, reinterpret_cast<OnlineKL<DIV>*>(sm));
    na = lognorm_from(on.ma, on.za);
    nb = lognorm_from(on.mb, on.zb);
    if (DIV == FORWARD_KL) {
      D = on.divergence();
      cc = -1.f;
    } else if (DIV == REVERSE_KL) {
      D = on.divergence();
      cc = D + 1.f;  // saved for the record; backward sums its own c' (backward_kernel)
    } else {
      // Per-thread sums in double, as the CPU kernel: c adds q g terms as large as |log p| (4e4
      // for one-hot teachers at |logits| 1e4) that q (g - c) cancels; the tree over threads is
      // short and stays fp32.
      double sphi = 0., sqg = 0.;
      for (int64_t j = (int64_t)threadIdx.x * N; j < V; j += (int64_t)THREADS * N) {
        float sv[N], tv[N];
        load_chunk(s, j, V, vec, sv);
        load_chunk(t, j, V, vec, tv);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float lp = log_prob(tv[k] * invT, na), lq = log_prob(sv[k] * invT, nb);
          float phi, qg;
          div_terms<DIV>(lp, lq, exp_fast(lp), exp_fast(lq), a.param, phi, qg);
          sphi += phi;
          sqg += qg;
        }
      }
      D = block_sum((float)sphi, sm);
      cc = block_sum((float)sqg, sm);
      if (lognorm_nan(na) || lognorm_nan(nb)) D = NAN;  // NaN input: terms with q = NaN read as 0
    }
  }
  LogNorm ns = nb;
  if (sep) {
    block_merge(os, reinterpret_cast<MaxSum*>(sm));
    ns = lognorm_from(os.m, os.z);
  }
  if (threadIdx.x == 0) {
    const float ce = !hard ? 0.f : bad_label ? NAN : hard_ce(ns, to_float(s[label]));
    a.loss[r] = row_loss(soft, a.soft_weight, a.temperature, D, hard, a.hard_weight, ce);
    store_row_stats(st, RowStats{na, nb, cc, ns});
  }
}

template <class S, int DIV>
__global__ void __launch_bounds__(THREADS) backward_kernel(RowsArgs a) {
  constexpr int N = Vec<S>::N;
  __shared__ float sm[WARPS];
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t V = a.V;
  S* g = static_cast<S*>(a.grad) + r * V;
  const bool gvec = aligned16(g);
  const int64_t label = a.labels ? a.labels[r] : 0;
  const bool ignored = a.labels && label == a.ignore_index;
  if (ignored) {
    float zero[N];
#pragma unroll
    for (int k = 0; k < N; ++k) zero[k] = 0.f;
    for (int64_t j = (int64_t)threadIdx.x * N; j < V; j += (int64_t)THREADS * N) store_chunk(g, j, V, gvec, zero);
    return;
  }
  const bool soft = a.soft_weight != 0.f;
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool bad_label = hard && (label < 0 || label >= V);
  const bool sep = hard && !(soft && a.temperature == 1.f);
  const S* s = static_cast<const S*>(a.student) + (r / a.L) * a.s_stride_b + (r % a.L) * a.s_stride_l;
  const S* t = static_cast<const S*>(a.teacher) + (r / a.t_L) * a.t_stride_b + (r % a.t_L) * a.t_stride_l;
  const bool vec = aligned16(s) && aligned16(t);
  const RowStats rs = load_row_stats(a.stats + r * STATS_WIDTH);
  const LogNorm na = rs.na, nb = rs.nb, ns = rs.ns;
  const float invT = 1.0f / a.temperature;
  float cc = rs.c;
  const float krev = DIV == REVERSE_KL ? reverse_kl_offset(na, nb) : 0.f;
  if (DIV == REVERSE_KL && soft) {
    // Reverse KL: d/db_j = q_j (x_j - c') with c' = sum_k q_k x_k summed here from the same
    // rounded x_k as the gradient (kd_math.h reverse_kl_qx / reverse_kl_qg, as the CPU kernel):
    // one more read of the row.
    float part = 0.f;
    for (int64_t j = (int64_t)threadIdx.x * N; j < V; j += (int64_t)THREADS * N) {
      float sv[N], tv[N];
      load_chunk(s, j, V, vec, sv);
      load_chunk(t, j, V, vec, tv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float ak = tv[k] * invT, bk = sv[k] * invT;
        part += reverse_kl_qx(exp_fast(log_prob(bk, nb)), ak, bk, krev);
      }
    }
    cc = block_sum(part, sm);
  }
  const float gl = a.grad_loss[r];
  const float k_soft = soft ? gl * a.soft_weight * a.temperature : 0.f;
  const float k_hard = hard ? (bad_label ? NAN : gl * a.hard_weight) : 0.f;
  for (int64_t j = (int64_t)threadIdx.x * N; j < V; j += (int64_t)THREADS * N) {
    float sv[N], tv[N], out[N];
    load_chunk(s, j, V, vec, sv);
    if (soft) load_chunk(t, j, V, vec, tv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float o = 0.f, q = 0.f;
      if (soft) {
        const float ak = tv[k] * invT, bk = sv[k] * invT;
        const float lp = log_prob(ak, na), lq = log_prob(bk, nb);
        const float p = exp_fast(lp);
        q = exp_fast(lq);
        float phi, qg;
        div_terms<DIV>(lp, lq, p, q, a.param, phi, qg);
        // reverse KL: qg - q c = q (x - c') without the cancellation (kd_math.h)
        o = DIV == REVERSE_KL ? k_soft * reverse_kl_qg(q, ak, bk, krev, cc) : k_soft * (qg - q * cc);
      }
      if (hard) {
        const float sm = sep ? exp_fast(log_prob(sv[k], ns)) : q;
        o += k_hard * (sm - (j + k == label ? 1.f : 0.f));
      }
      out[k] = o;
    }
    store_chunk(g, j, V, gvec, out);
  }
}

template <class S, int DIV>
int launch(const RowsArgs& a, cudaStream_t stream, bool fwd) {
  if (a.N == 0) return 0;
  dim3 grid((unsigned)a.N), block(THREADS);
  void (*kernel)(RowsArgs) = fwd ? forward_kernel<S, DIV> : backward_kernel<S, DIV>;
  KD_LAUNCH(kernel, grid, block, 0, stream, a);
  return (int)cudaGetLastError();
}

template <class S>
int dispatch_div(const RowsArgs& a, cudaStream_t stream, bool fwd) {
  switch (a.div) {
    case FORWARD_KL: return launch<S, FORWARD_KL>(a, stream, fwd);
    case REVERSE_KL: return launch<S, REVERSE_KL>(a, stream, fwd);
    case JSD: return launch<S, JSD>(a, stream, fwd);
    case SKEW_KL: return launch<S, SKEW_KL>(a, stream, fwd);
    case SKEW_REVERSE_KL: return launch<S, SKEW_REVERSE_KL>(a, stream, fwd);
    case TVD: return launch<S, TVD>(a, stream, fwd);
    default: return (int)cudaErrorInvalidValue;
  }
}

int dispatch(const RowsArgs& a, void* stream, bool fwd) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case F32: return dispatch_div<float>(a, st, fwd);
    case BF16: return dispatch_div<__nv_bfloat16>(a, st, fwd);
    case F16: return dispatch_div<__half>(a, st, fwd);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

int cuda_forward_rows(const RowsArgs& args, void* stream) { return dispatch(args, stream, true); }
int cuda_backward_rows(const RowsArgs& args, void* stream) { return dispatch(args, stream, false); }
const char* cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // namespace kd
