// CUDA kernels of logit_mse (divergence id LOGIT_MSE; per-element math and stats layout in
// csrc/include/kd_mse.h, shared with the CPU kernels of csrc/cpu/mse_cpu.cpp).
//
// Included by kd_cuda.cu inside its anonymous namespace (it uses that file's chunk loads and
// stores, block reductions and launch conventions: one CTA of THREADS threads per row, 16-byte
// vector loads with a peeled unaligned head); so it compiles with nvcc and under the host
// emulation (csrc/testing/kd_cuda_emu.cpp) with kd_cuda.cu itself. kd_cuda.cu includes kd_mse.h.
//
//   forward:  pass 1: each thread sums d = t - s over its chunks' kept columns (fp32 per chunk,
//             compensated across chunks) and counts them; the CTA sums give mu and n. Pass 2 sums
//             c^2, c = d - mu, the same way. The hard term's (max, sum-exp) of s rides on pass 1.
//   backward: one pass, -soft_weight * c / n + hard_weight * (softmax(s) - onehot).
// Lanes outside [0, V) load -inf in both rows (load_chunk): left out like shared -inf columns.

// Writes v over this thread's chunks of one gradient row.
template <class S>
__device__ __forceinline__ void mse_fill_row(S* g, int64_t j0, int64_t V, bool vec, float v) {
  constexpr int N = Vec<S>::N;
  float b[N];
#pragma unroll
  for (int k = 0; k < N; ++k) b[k] = v;
  for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) store_chunk(g, j, V, vec, b);
}

template <class S, bool SOFT, bool HARD>
__global__ void __launch_bounds__(THREADS) mse_forward_kernel(RowsArgs a) {
  constexpr int N = Vec<S>::N;
  __shared__ float sm[sizeof(MaxSum) / sizeof(float) * WARPS];  // block reductions
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t label = a.labels ? a.labels[r] : 0;
  float* st = a.stats + r * STATS_WIDTH;
  if (a.labels && label == a.ignore_index) {
    if (threadIdx.x == 0) {
      a.loss[r] = 0.f;
      for (int k = 0; k < STATS_WIDTH; ++k) st[k] = 0.f;
    }
    return;
  }
  const bool bad_label = HARD && (label < 0 || label >= a.V);
  const S* s = static_cast<const S*>(a.student) + (r / a.L) * a.s_stride_b + (r % a.L) * a.s_stride_l;
  const S* t = static_cast<const S*>(a.teacher) + (r / a.t_L) * a.t_stride_b + (r % a.t_L) * a.t_stride_l;
  const bool vs = vector_ok<S>(s), vt = vs && same_phase(s, t);
  const int64_t V = a.V;
  const int64_t j0 = first_chunk<S>(head_of<S>(s));

  KahanSum sd;
  sd.init();
  float kept = 0.f;  // this thread's count (exact: far below 2^24)
  MaxSum os;
  os.init();
  for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
    float sv[N], tv[N];
    load_chunk(s, j, V, vs, sv);
    if (SOFT) {
      load_chunk(t, j, V, vt, tv);
      float cs = 0.f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        cs += mse_diff(tv[k], sv[k]);
        kept += mse_kept(tv[k], sv[k]) ? 1.f : 0.f;
      }
      sd.add(cs);
    }
    if (HARD) {
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
  float mu = 0.f, n = 0.f, sum_c2 = 0.f;
  if (SOFT) {
    const float sum_d = block_sum(sd.sum - sd.comp, sm);
    n = block_sum(kept, sm);
    mu = mse_mean(sum_d, n);
    if (mse_grad_defined(mu)) {  // the same in every thread: a uniform branch
      KahanSum sc;
      sc.init();
      for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
        float sv[N], tv[N];
        load_chunk(s, j, V, vs, sv);
        load_chunk(t, j, V, vt, tv);
        float cs = 0.f;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float c = mse_centred(tv[k], sv[k], mu);
          cs += c * c;
        }
        sc.add(cs);
      }
      sum_c2 = block_sum(sc.sum - sc.comp, sm);
    }
  }
  LogNorm ns{0.f, 0.f};
  if (HARD) {
    block_merge(os, reinterpret_cast<MaxSum*>(sm));
    ns = lognorm_from(os.m, os.z);
  }
  if (threadIdx.x == 0) {
    float loss = SOFT ? a.soft_weight * mse_loss(sum_c2, n, mu) : 0.f;
    if (HARD) loss += a.hard_weight * (bad_label ? NAN : hard_ce(ns, to_float(s[label])));
    a.loss[r] = loss;
    store_mse_stats(st, mu, n, ns);
  }
}

template <class S, bool SOFT, bool HARD>
__global__ void __launch_bounds__(THREADS) mse_backward_kernel(RowsArgs a) {
  constexpr int N = Vec<S>::N;
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t V = a.V;
  S* g = static_cast<S*>(a.grad) + r * V;
  const S* s = static_cast<const S*>(a.student) + (r / a.L) * a.s_stride_b + (r % a.L) * a.s_stride_l;
  const S* t = static_cast<const S*>(a.teacher) + (r / a.t_L) * a.t_stride_b + (r % a.t_L) * a.t_stride_l;
  const bool vs = vector_ok<S>(s), vt = vs && same_phase(s, t), vg = vs && same_phase(s, g);
  const int64_t j0 = first_chunk<S>(head_of<S>(s));
  const int64_t label = a.labels ? a.labels[r] : 0;
  if (a.labels && label == a.ignore_index) {
    mse_fill_row(g, j0, V, vg, 0.f);
    return;
  }
  const float* st = a.stats + r * STATS_WIDTH;
  const float mu = st[MSE_MU], n = st[MSE_N];  // columns 0 and 1 only (kd_mse.h)
  const LogNorm ns{st[STAT_MS], st[STAT_LZS]};
  if (SOFT && !mse_grad_defined(mu)) {
    mse_fill_row(g, j0, V, vg, NAN);  // -inf in one model only: NaN row (docs/precision.md)
    return;
  }
  const float gl = a.grad_loss[r];
  const float k_soft = SOFT ? gl * a.soft_weight / mse_divisor(n) : 0.f;
  // A label outside [0, V) that is not ignore_index adds the softmax term and no one-hot.
  const float k_hard = HARD ? gl * a.hard_weight : 0.f;
  for (int64_t j = j0; j < V; j += (int64_t)THREADS * N) {
    float sv[N], tv[N], out[N];
    load_chunk(s, j, V, vs, sv);
    if (SOFT) load_chunk(t, j, V, vt, tv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float o = SOFT ? -k_soft * mse_centred(tv[k], sv[k], mu) : 0.f;
      if (HARD) o += k_hard * (exp_fast(log_prob(sv[k], ns)) - (j + k == label ? 1.f : 0.f));
      out[k] = o;
    }
    store_chunk(g, j, V, vg, out);
  }
}

template <class S>
int launch_mse(const RowsArgs& a, cudaStream_t stream, bool fwd) {
  if (a.N == 0) return 0;
  const bool soft = a.soft_weight != 0.f;
  const bool hard = a.labels && a.hard_weight != 0.f;
  void (*kernel)(RowsArgs);
  if (fwd)
    kernel = soft ? (hard ? mse_forward_kernel<S, true, true> : mse_forward_kernel<S, true, false>)
                  : (hard ? mse_forward_kernel<S, false, true> : mse_forward_kernel<S, false, false>);
  else
    kernel = soft ? (hard ? mse_backward_kernel<S, true, true> : mse_backward_kernel<S, true, false>)
                  : (hard ? mse_backward_kernel<S, false, true> : mse_backward_kernel<S, false, false>);
  dim3 grid((unsigned)a.N), block(THREADS);
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // as launch()
  KD_LAUNCH(kernel, grid, block, 0, stream, a);
  return (int)cudaGetLastError();
}
