// CUDA row kernels of teacher ensembles (ensemble_cuda.h): included at the end of kd_cuda.cu, so
// they use that file's helpers (load_chunk, store_chunk, fill_row, block_merge, block_sum,
// head_of / vector_ok / same_phase / first_chunk, THREADS) and kd_math.h's per-element math, not
// copies. One CTA per row, as the single-teacher kernels:
//   forward: a statistics pass per tensor (student: (max, sum-exp) of s/T and, for the hard term,
//     of s; then each teacher's of t_m/T), each read once, raw maxima as kd_cuda.cu keeps them;
//     then one pass forming per chunk log p = hi + log(acc), acc = sum_m w_m e^{log p_m - hi}
//     accumulated teacher by teacher with a running maximum hi of the log p_m (identical teachers
//     give log p = log p_0 exactly when the weights sum to 1), and phi, q g as for one teacher.
//     Forward / reverse KL have no online form with an ensemble: they take this pass too.
//   backward: the same log p per chunk, then q (g - c) (c from forward: for reverse KL it is the
//     sum of the same per-element q g the gradient uses, so the rounding of a dominant term
//     cancels as with kd_cuda.cu's resummed c'), the hard term, the +inf-loss rule (fill_row NaN).
#pragma once

#include "ensemble_cuda.h"

namespace kd {
namespace {

// (max, sum-exp) of x k with the max in raw units of x: exponents (x - m) k, the shift first.
struct ScaledMaxSum {
  float m, z, k;
  __device__ __forceinline__ float factor(float m_old, float m_new) const {
    return m_old == kNegInf ? 0.f : expf((m_old - m_new) * k);
  }
  __device__ __forceinline__ void merge(const ScaledMaxSum& o) {
    float mn = m > o.m ? m : o.m;
    if (o.m != o.m) mn = o.m;  // NaN propagates
    z = z * factor(m, mn) + o.z * factor(o.m, mn);
    m = mn;
  }
  // Absorb one chunk of N values (-inf lanes carry nothing).
  template <int N>
  __device__ __forceinline__ void absorb(const float* x) {
    float bm = kNegInf;
#pragma unroll
    for (int i = 0; i < N; ++i) bm = fmaxf(bm, x[i]);
    const float nm = raise_max(m, bm);
    z *= factor(m, nm);
    m = nm;
    const float off = safe_max(nm);
#pragma unroll
    for (int i = 0; i < N; ++i) z += exp_fast((x[i] - off) * k);
  }
};

__device__ __forceinline__ ScaledMaxSum shfl_xor(const ScaledMaxSum& x, int off) {
  return ScaledMaxSum{__shfl_xor_sync(0xffffffffu, x.m, off), __shfl_xor_sync(0xffffffffu, x.z, off), x.k};
}

// Per-CTA teacher table of one row: row pointers, vector flags, normalisers, weights.
struct EnsShared {
  const void* row[kCudaEnsMaxTeachers];
  int vec[kCudaEnsMaxTeachers];
  float m[kCudaEnsMaxTeachers], lz[kCudaEnsMaxTeachers], w[kCudaEnsMaxTeachers];
};

template <class S>
__device__ __forceinline__ const S* ens_student_row(const RowsArgs& a, int64_t r) {
  return static_cast<const S*>(a.student) + (r / a.L) * a.s_stride_b + (r % a.L) * a.s_stride_l;
}

// Threads m < M fill teacher m's row pointer, vector flag and weight (the caller synchronises).
template <class S>
__device__ __forceinline__ void ens_teacher_rows(const CudaEnsTeachers& t, int64_t r, const S* s, bool vs,
                                                 EnsShared& sh) {
  const int m = threadIdx.x;
  if (m < t.M) {
    const S* row = static_cast<const S*>(t.ptr[m]) + (r / t.L[m]) * t.stride_b[m] + (r % t.L[m]) * t.stride_l[m];
    sh.row[m] = row;
    sh.vec[m] = vs && same_phase(s, row);
    sh.w[m] = t.w[m];
  }
}

// Stats column of teacher m's max (its log sum-exp is the next one).
__device__ __forceinline__ int ens_col(int m) { return m == 0 ? STAT_MA : STATS_WIDTH + 2 * (m - 1); }

// log p = log sum_m w_m p_m of the chunk at column j (lanes outside [0, V): -inf).
template <class S>
__device__ __forceinline__ void ens_logp(const EnsShared& sh, int M, int64_t j, int64_t V, float invT,
                                         float* lp) {
  constexpr int N = Vec<S>::N;
  float hi[N], acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    hi[i] = kNegInf;
    acc[i] = 0.f;
  }
  for (int m = 0; m < M; ++m) {
    float tv[N];
    load_chunk(static_cast<const S*>(sh.row[m]), j, V, sh.vec[m] != 0, tv);
    const LogNorm n{sh.m[m], sh.lz[m]};
    const float w = sh.w[m];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float lpm = log_prob_scaled(tv[i], n, invT);
      const float hn = raise_max(hi[i], lpm), hs = safe_max(hn);
      acc[i] = acc[i] * exp_nonpos(hi[i] - hs) + w * exp_nonpos(lpm - hs);
      hi[i] = hn;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) lp[i] = hi[i] + log_fast(acc[i]);
}

template <class S, int DIV, bool SOFT, bool SEP>
__global__ void __launch_bounds__(THREADS) ens_forward_kernel(CudaEnsArgs e) {
  constexpr int N = Vec<S>::N;
  __shared__ float sm[4 * WARPS];  // block reductions (ScaledMaxSum: 3 floats)
  __shared__ EnsShared sh;
  const RowsArgs& a = e.rows;
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t label = a.labels ? a.labels[r] : 0;
  const bool ignored = a.labels && label == a.ignore_index;
  float* st = a.stats + r * e.width;
  if (ignored) {
    if (threadIdx.x == 0) {
      a.loss[r] = 0.f;
      for (int64_t k = 0; k < e.width; ++k) st[k] = 0.f;
    }
    return;
  }
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool bad_label = hard && (label < 0 || label >= a.V);
  const S* s = ens_student_row<S>(a, r);
  const bool vs = vector_ok<S>(s);
  const float invT = 1.0f / a.temperature;
  const int64_t V = a.V;
  const int64_t j0 = first_chunk<S>(head_of<S>(s));
  const int M = e.t.M;

  // Student: (max, sum-exp) of s/T and (hard term, T != 1) of s, one read.
  LogNorm nb{0.f, 0.f}, ns{0.f, 0.f};
  {
    ScaledMaxSum ob{kNegInf, 0.f, invT}, os{kNegInf, 0.f, 1.f};
    for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
      float sv[N];
      load_chunk(s, j, V, vs, sv);
      if (SOFT) ob.absorb<N>(sv);
      if (SEP) os.absorb<N>(sv);
    }
    if (SOFT) {
      block_merge(ob, reinterpret_cast<ScaledMaxSum*>(sm));
      nb = lognorm_from(ob.m, ob.z);
    }
    ns = nb;
    if (SEP) {
      block_merge(os, reinterpret_cast<ScaledMaxSum*>(sm));
      ns = lognorm_from(os.m, os.z);
    }
  }
  float D = 0.f, cc = 0.f;
  if (SOFT) {
    ens_teacher_rows<S>(e.t, r, s, vs, sh);
    __syncthreads();
    bool nan_norm = lognorm_nan(nb);
    for (int m = 0; m < M; ++m) {  // each teacher's normaliser, one read each
      const S* t = static_cast<const S*>(sh.row[m]);
      const bool vt = sh.vec[m] != 0;
      ScaledMaxSum ot{kNegInf, 0.f, invT};
      for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
        float tv[N];
        load_chunk(t, j, V, vt, tv);
        ot.absorb<N>(tv);
      }
      block_merge(ot, reinterpret_cast<ScaledMaxSum*>(sm));
      const LogNorm n = lognorm_from(ot.m, ot.z);
      nan_norm = nan_norm || lognorm_nan(n);
      if (threadIdx.x == 0) {
        sh.m[m] = n.m;
        sh.lz[m] = n.lz;
      }
    }
    __syncthreads();
    // D = sum phi, c = sum q g against the ensemble's log p (fp32 per chunk, double across
    // chunks, as kd_cuda.cu's row_sums).
    double sphi = 0., sqg = 0.;
    for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
      float sv[N], lp[N];
      load_chunk(s, j, V, vs, sv);
      ens_logp<S>(sh, M, j, V, invT, lp);
      float cphi = 0.f, cqg = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float lq = log_prob_scaled(sv[i], nb, invT);
        float phi, qg;
        div_terms<DIV>(lp[i], lq, exp_fast(lp[i]), exp_fast(lq), a.param, phi, qg);
        cphi += phi;
        cqg += qg;
      }
      sphi += (double)cphi;
      sqg += (double)cqg;
    }
    D = block_sum((float)sphi, sm);
    cc = block_sum((float)sqg, sm);
    if (DIV == FORWARD_KL) cc = -1.f;  // sum q g = -sum p
    if (nan_norm) D = NAN;             // NaN input: terms with p or q = NaN may read as 0
  }
  if (threadIdx.x == 0) {
    const float ce = !hard ? 0.f : bad_label ? NAN : hard_ce(ns, to_float(s[label]));
    a.loss[r] = row_loss(SOFT, a.soft_weight, a.temperature, D, hard, a.hard_weight, ce);
    store_row_stats(st, RowStats{SOFT ? LogNorm{sh.m[0], sh.lz[0]} : LogNorm{0.f, 0.f}, nb, cc, ns});
    for (int m = 1; m < M; ++m) {
      st[ens_col(m)] = SOFT ? sh.m[m] : 0.f;
      st[ens_col(m) + 1] = SOFT ? sh.lz[m] : 0.f;
    }
  }
}

template <class S, int DIV, bool SOFT, bool HARD>
__global__ void __launch_bounds__(THREADS) ens_backward_kernel(CudaEnsArgs e) {
  constexpr int N = Vec<S>::N;
  __shared__ EnsShared sh;
  const RowsArgs& a = e.rows;
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t V = a.V;
  S* g = static_cast<S*>(a.grad) + r * V;
  const S* s = ens_student_row<S>(a, r);
  const bool vs = vector_ok<S>(s), vg = vs && same_phase(s, g);
  const int64_t j0 = first_chunk<S>(head_of<S>(s));
  const int64_t label = a.labels ? a.labels[r] : 0;
  if (a.labels && label == a.ignore_index) {
    fill_row(g, j0, V, V, vg, 0.f);
    return;
  }
  const int M = e.t.M;
  const bool sep = HARD && (!SOFT || a.temperature != 1.f);
  const float* st = a.stats + r * e.width;
  const LogNorm nb{st[STAT_MB], st[STAT_LZB]}, ns{st[STAT_MS], st[STAT_LZS]};
  const float cc = st[STAT_C];
  const float invT = 1.0f / a.temperature;
  if (SOFT) {
    ens_teacher_rows<S>(e.t, r, s, vs, sh);
    if ((int)threadIdx.x < M) {
      sh.m[threadIdx.x] = st[ens_col(threadIdx.x)];
      sh.lz[threadIdx.x] = st[ens_col(threadIdx.x) + 1];
    }
    __syncthreads();
    if (!grad_defined(cc)) {        // the same value in every thread: a uniform branch
      fill_row(g, j0, V, V, vg, NAN);  // an infinite term in the gradient (docs/precision.md)
      return;
    }
  }
  const float gl = a.grad_loss[r];
  const float k_soft = SOFT ? gl * a.soft_weight * a.temperature : 0.f;
  const float k_hard = HARD ? gl * a.hard_weight : 0.f;
  for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
    float sv[N], lp[N], out[N];
    load_chunk(s, j, V, vs, sv);
    if (SOFT) ens_logp<S>(sh, M, j, V, invT, lp);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float o = 0.f, q = 0.f;
      if (SOFT) {
        const float lq = log_prob_scaled(sv[i], nb, invT);
        q = exp_fast(lq);
        float phi, qg;
        div_terms<DIV>(lp[i], lq, exp_fast(lp[i]), q, a.param, phi, qg);
        o = k_soft * (qg - q * cc);
      }
      if (HARD) {
        const float sm1 = sep ? exp_fast(log_prob(sv[i], ns)) : q;
        o += k_hard * (sm1 - (j + i == label ? 1.f : 0.f));
      }
      out[i] = o;
    }
    store_chunk(g, j, V, vg, out);
  }
}

template <class S, int DIV>
int ens_launch(const CudaEnsArgs& e, cudaStream_t stream, bool fwd) {
  const RowsArgs& a = e.rows;
  if (a.N == 0) return 0;
  if (e.t.M < 1 || e.t.M > kCudaEnsMaxTeachers) return (int)cudaErrorInvalidValue;
  const bool soft = a.soft_weight != 0.f;
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool sep = hard && !(soft && a.temperature == 1.f);
  void (*kernel)(CudaEnsArgs);
  if (fwd)
    kernel = soft ? (sep ? ens_forward_kernel<S, DIV, true, true> : ens_forward_kernel<S, DIV, true, false>)
                  : (sep ? ens_forward_kernel<S, DIV, false, true> : ens_forward_kernel<S, DIV, false, false>);
  else
    kernel = soft ? (hard ? ens_backward_kernel<S, DIV, true, true> : ens_backward_kernel<S, DIV, true, false>)
                  : (hard ? ens_backward_kernel<S, DIV, false, true> : ens_backward_kernel<S, DIV, false, false>);
  dim3 grid((unsigned)a.N), block(THREADS);
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // as launch()
  KD_LAUNCH(kernel, grid, block, 0, stream, e);
  return (int)cudaGetLastError();
}

template <class S>
int ens_dispatch_div(const CudaEnsArgs& e, cudaStream_t stream, bool fwd) {
  switch (e.rows.div) {
    case FORWARD_KL: return ens_launch<S, FORWARD_KL>(e, stream, fwd);
    case REVERSE_KL: return ens_launch<S, REVERSE_KL>(e, stream, fwd);
    case JSD: return ens_launch<S, JSD>(e, stream, fwd);
    case SKEW_KL: return ens_launch<S, SKEW_KL>(e, stream, fwd);
    case SKEW_REVERSE_KL: return ens_launch<S, SKEW_REVERSE_KL>(e, stream, fwd);
    case TVD: return ens_launch<S, TVD>(e, stream, fwd);
    default: return (int)cudaErrorInvalidValue;
  }
}

int ens_dispatch(const CudaEnsArgs& e, void* stream, bool fwd) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (e.rows.dtype) {
    case F32: return ens_dispatch_div<float>(e, st, fwd);
    case BF16: return ens_dispatch_div<__nv_bfloat16>(e, st, fwd);
    case F16: return ens_dispatch_div<__half>(e, st, fwd);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

int cuda_forward_rows_ensemble(const CudaEnsArgs& args, void* stream) { return ens_dispatch(args, stream, true); }
int cuda_backward_rows_ensemble(const CudaEnsArgs& args, void* stream) { return ens_dispatch(args, stream, false); }

}  // namespace kd
