// CUDA row kernels: one CTA per row. Same passes and the same per-element math (kd_math.h) as the
// CPU kernels: forward = statistics pass (online (max, sum-exp) of t/T, s/T and s, with forward /
// reverse KL accumulated online) + a second pass for the other divergences; backward recomputes
// p and q from the saved per-row (A, B, c, S) and writes the gradient.
//
// Precision: maxima are kept in raw logit units and every scaled logit is formed as (x - m) / T,
// the shift before the scaling (as the Triton kernels): x - m is exact near the maximum, so at
// |logits| ~ 1e4 or T ~ 0.05 the likely tokens carry no rounding of size ulp(x / T), and a teacher
// that is the student plus a constant gives exactly the student's log-probabilities. The stats
// row holds (mt, log za, ms, log zb, c, ms1, log zs): raw maxima, log sum-exps centred on them.
//
// Loads are 16-byte vectors. A row whose start is not 16-byte aligned (bf16 with V % 8 != 0, row
// views such as logits[:, :-1]) peels its unaligned head: thread 0's first chunk is the `head`
// elements before the first 16-byte boundary (scalar loads), every other chunk starts on a
// boundary. The teacher and the gradient use vector loads / stores too when their start has the
// student's offset modulo 16 (the usual case: same V, same view), scalar ones otherwise.
// The soft / hard-term switches are template parameters of the kernels (no runtime branches in
// the loops). Reductions: warp shuffles, then one value per warp through shared memory.
// Offsets are int64. No torch headers: the binding lives in bindings_cuda.cpp.
//
// The same file runs on the CPU under the host emulation of the CUDA execution model
// (csrc/testing/cuda_emu.h, tests only): hence KD_LAUNCH instead of <<<...>>>.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <cstring>
#include <cstdlib>
#include <type_traits>
#include <utility>

#include "kd_cuda.h"
#include "kd_math.h"
#include "kd_mse.h"

// Kernel launch: triple chevrons under nvcc; the host emulation (csrc/testing/cuda_emu.h, tests
// only) defines KD_LAUNCH to run the same kernel on the CPU.
#ifndef KD_LAUNCH
#define KD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

// Thread-block clusters (compute capability 9.0): the launch (cudaLaunchKernelEx with a cluster
// dimension; the host emulation defines KD_LAUNCH_CLUSTER itself) and, in kd::, the device side
// (rank, size, barrier, distributed shared memory, dynamic shared memory) that cluster_grad_kernel
// uses. KD_HAS_CLUSTERS: device code for them is compiled (sm_90 and the emulation; on sm_80 the
// kernel is empty and never launched: launch_cluster_grad checks the device).
#if defined(KD_CUDA_EMULATE_ACTIVE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define KD_HAS_CLUSTERS 1
#else
#define KD_HAS_CLUSTERS 0
#endif
#if !defined(KD_CUDA_EMULATE_ACTIVE)
#include <cooperative_groups.h>
#endif
#ifndef KD_LAUNCH_CLUSTER
template <class... P, class... A>
void kd_launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, unsigned cluster, size_t smem,
                       cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  (void)cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);  // its error: cudaGetLastError
}
#define KD_LAUNCH_CLUSTER(kernel, grid, block, cluster, smem, stream, ...) \
  kd_launch_cluster(kernel, grid, block, cluster, smem, stream, __VA_ARGS__)
#endif

namespace kd {
#if !defined(KD_CUDA_EMULATE_ACTIVE)
extern __shared__ __align__(16) float kd_dynamic_smem[];
#endif
namespace {

#if defined(KD_CUDA_EMULATE_ACTIVE)
__device__ __forceinline__ float* dynamic_smem() { return static_cast<float*>(kd_emu::dynamic_smem()); }
__device__ __forceinline__ unsigned cluster_rank() { return kd_emu::cluster_rank(); }
__device__ __forceinline__ unsigned cluster_size() { return kd_emu::cluster_size(); }
#define cluster_sync()                              \
  do {                                              \
    ::kd_emu::cluster_arrive(__FILE__, __LINE__);   \
    ::kd_emu::cluster_wait(__FILE__, __LINE__);     \
  } while (0)
template <class T>
__device__ __forceinline__ const T* cluster_map(const T* p, unsigned rank) {
  return static_cast<const T*>(kd_emu::map_shared_rank(p, rank));
}
#elif KD_HAS_CLUSTERS
__device__ __forceinline__ float* dynamic_smem() { return kd_dynamic_smem; }
__device__ __forceinline__ unsigned cluster_rank() { return cooperative_groups::this_cluster().block_rank(); }
__device__ __forceinline__ unsigned cluster_size() { return cooperative_groups::this_cluster().num_blocks(); }
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
template <class T>
__device__ __forceinline__ const T* cluster_map(const T* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(p), rank);
}
#endif

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

// Elements before the first 16-byte boundary of a row (0 when aligned; the row start is always
// element-aligned for torch tensors, else no vector loads: `vector_ok`).
template <class S>
__device__ __forceinline__ int head_of(const void* p) {
  const unsigned mis = (unsigned)(reinterpret_cast<uintptr_t>(p) & 15u);
  return (int)(((16u - mis) & 15u) / sizeof(S));
}
template <class S>
__device__ __forceinline__ bool vector_ok(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(S)) == 0;
}
// Same offset modulo 16: vector accesses at the same column indices are aligned for both.
__device__ __forceinline__ bool same_phase(const void* p, const void* q) {
  return ((reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(q)) & 15u) == 0;
}
// First column of this thread's first chunk: chunks start at head - N (the peeled head, whose
// lanes below column 0 are empty) when head > 0, else at 0.
template <class S>
__device__ __forceinline__ int64_t first_chunk(int head) {
  constexpr int N = Vec<S>::N;
  return (head ? (int64_t)head - N : 0) + (int64_t)threadIdx.x * N;
}

// Load columns [j, j + N) of a row into fp32: one 16-byte load when `vec` and the chunk lies in
// [0, V) (then row + j is 16-byte aligned), else bounded scalar loads; lanes outside [0, V) get
// -inf so they carry no probability.
// The N elements of one 16-byte chunk in fp32.
template <class S>
__device__ __forceinline__ void unpack_chunk(uint4 raw, float* out) {
  if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    // bf16 is the upper half of an fp32: one shift or mask per element (to_float of each half
    // took a byte permute and a shift for the upper one)
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = bits_to_float((int32_t)(w[k] << 16));
      out[2 * k + 1] = bits_to_float((int32_t)(w[k] & 0xffff0000u));
    }
  } else {
    const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
    for (int k = 0; k < Vec<S>::N; ++k) out[k] = to_float(e[k]);
  }
}

template <class S>
__device__ __forceinline__ void load_chunk(const S* row, int64_t j, int64_t V, bool vec, float* out) {
  constexpr int N = Vec<S>::N;
  if (vec && j >= 0 && j + N <= V) {
    unpack_chunk<S>(*reinterpret_cast<const uint4*>(row + j), out);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = (j + k >= 0 && j + k < V) ? to_float(row[j + k]) : kNegInf;
  }
}

// One 16-byte global store of 4 words at a 16-byte aligned address (nvcc 13 split the store of a
// uint4 filled through an S* view into four 4-byte STGs; benchmarks/gpu_model.py counts them).
__device__ __forceinline__ void store16(void* p, const uint32_t* w) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
               "r"(w[3])
               : "memory");
#else
  uint4 raw;
  raw.x = w[0];
  raw.y = w[1];
  raw.z = w[2];
  raw.w = w[3];
  *reinterpret_cast<uint4*>(p) = raw;
#endif
}

// The bits of one element, zero-extended to 32 bits.
template <class S>
__device__ __forceinline__ uint32_t bits_of(S x) {
  if constexpr (sizeof(S) == 4) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
  } else {
    unsigned short u;
    memcpy(&u, &x, 2);
    return (uint32_t)u;
  }
}

template <class S>
__device__ __forceinline__ void store_chunk(S* row, int64_t j, int64_t V, bool vec, const float* in) {
  constexpr int N = Vec<S>::N;
  if (vec && j >= 0 && j + N <= V) {
    uint32_t w[4];  // the N elements packed into 32-bit words
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(S) == 4) {
        w[k] = bits_of(from_float<S>(in[k]));
      } else {
        w[k] = bits_of(from_float<S>(in[2 * k])) | (bits_of(from_float<S>(in[2 * k + 1])) << 16);
      }
    }
    store16(row + j, w);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (j + k >= 0 && j + k < V) row[j + k] = from_float<S>(in[k]);
  }
}

// The running maximum of a thread's raw 16-byte chunks (cluster_grad_kernel's copy): on the GPU
// (sm_80+) per 32-bit word in the dtype, max.bf16x2 / max.f16x2 taking two elements an
// instruction, fp32 by fmaxf; elsewhere (the host emulation) the chunk's fp32 values by fmaxf.
// Both return the other input where one is NaN, so value() is the maximum of the non-NaN
// elements, -inf where there are none (as the statistics pass's running maxima: fmaxf / raise_max).
template <class S>
struct RawMax {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t w[4];
  static __device__ __forceinline__ uint32_t max_word(uint32_t a, uint32_t b) {
    uint32_t d;
    if constexpr (std::is_same<S, __nv_bfloat16>::value)
      asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    else if constexpr (std::is_same<S, __half>::value)
      asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    else
      d = __float_as_uint(fmaxf(__uint_as_float(a), __uint_as_float(b)));
    return d;
  }
  __device__ __forceinline__ void init() {
    const uint32_t b = sizeof(S) == 4 ? 0xff800000u : bits_of(from_float<S>(kNegInf)) * 0x10001u;
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = b;
  }
  __device__ __forceinline__ void add(uint4 raw) {
    w[0] = max_word(w[0], raw.x);
    w[1] = max_word(w[1], raw.y);
    w[2] = max_word(w[2], raw.z);
    w[3] = max_word(w[3], raw.w);
  }
  __device__ __forceinline__ float value() const {
    const uint32_t x = max_word(max_word(w[0], w[1]), max_word(w[2], w[3]));
    if constexpr (sizeof(S) == 4) return fmaxf(kNegInf, __uint_as_float(x));
    float v[Vec<S>::N];
    unpack_chunk<S>(make_uint4(x, x, x, x), v);
    return fmaxf(kNegInf, fmaxf(v[0], v[1]));
  }
#else
  float m;
  __device__ __forceinline__ void init() { m = kNegInf; }
  __device__ __forceinline__ void add(uint4 raw) {
    float v[Vec<S>::N];
    unpack_chunk<S>(raw, v);
#pragma unroll
    for (int k = 0; k < Vec<S>::N; ++k) m = fmaxf(m, v[k]);
  }
  __device__ __forceinline__ float value() const { return m; }
#endif
};

// Partial row states and their merges (block_merge: the logit_mse and ensemble kernels; the
// row kernels' states go through merge_row_state). The hard term's is a plain (max, sum-exp)
// pair (T = 1).
struct MaxSum {
  float m, z;
  __device__ __forceinline__ void init() { m = kNegInf; z = 0.f; }
  __device__ __forceinline__ void merge(const MaxSum& o) { merge_max_sum(m, z, o.m, o.z); }
};

__device__ __forceinline__ MaxSum shfl_xor(const MaxSum& x, int off) {
  return MaxSum{__shfl_xor_sync(0xffffffffu, x.m, off), __shfl_xor_sync(0xffffffffu, x.z, off)};
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

// Where a pass reads a row's columns from: global memory (GlobalCols: one CTA per row) or the
// CTA's slice of the row in shared memory (SharedCols: cluster_grad_kernel). load(j, out): columns
// [j, j + N) in fp32, -inf outside [0, V); at(j): column j (0 <= j < V, in one of this thread's
// chunks). A pass runs j from its thread's first chunk j0 to `end` in steps of THREADS * N:
// (first_chunk(head), V) for the whole row, the slice's for a CTA of a cluster.
template <class S>
struct GlobalCols {
  const S* p;
  int64_t V;
  bool vec;
  __device__ __forceinline__ void load(int64_t j, float* out) const { load_chunk(p, j, V, vec, out); }
  __device__ __forceinline__ float at(int64_t j) const { return to_float(p[j]); }
};
template <class S>
struct SharedCols {
  const S* sm;  // the chunk starting at column lo
  int64_t lo;
  __device__ __forceinline__ void load(int64_t j, float* out) const {
    unpack_chunk<S>(*reinterpret_cast<const uint4*>(sm + (int)(j - lo)), out);
  }
  __device__ __forceinline__ float at(int64_t j) const { return to_float(sm[(int)(j - lo)]); }
};

// K floats of every thread combined over the CTA by op (max or +, commutative): a butterfly in
// each warp, then every thread combines the warps' results in warp order from `sm`
// (K * WARPS floats), so every thread of the CTA ends with the same values, bitwise.
template <bool MAX>
__device__ __forceinline__ float combine(float a, float b) { return MAX ? fmaxf(a, b) : a + b; }

template <bool MAX, int K>
__device__ __forceinline__ void block_reduce(float (&x)[K], float* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // the barrier first: the scratch's last readers are done, and the warps arrive at the shuffles
  // converged (after it, ptxas's reconvergence call before them kept 8-byte values across it on
  // the stack: spills in forward_kernel / forward_grad_kernel variants)
  __syncthreads();
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = combine<MAX>(x[k], __shfl_xor_sync(0xffffffffu, x[k], off));
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) sm[warp * K + k] = x[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float t = sm[k];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) t = combine<MAX>(t, sm[w * K + k]);
    x[k] = t;
  }
}

// One float summed over the CTA (`sm`: WARPS floats); an exact zero comes out as +0, as from a
// sum started at 0.
__device__ __forceinline__ float block_sum(float x, float* sm) {
  float v[1] = {x};
  block_reduce<false>(v, sm);
  return v[0] + 0.f;
}

// How a pass's per-thread partial results become the row's: reduce<MAX>(x) combines K floats
// over the CTA (CtaReduce, `sm`: K * WARPS floats of scratch) or over the CTAs of a cluster
// (ClusterReduce, cluster_grad_kernel: through distributed shared memory); sum(x) is one sum.
// The row states (forward_row) are merged by merge_row_state from such reductions. leader():
// this CTA writes the row's loss.
struct CtaReduce {
  float* sm;
  template <bool MAX, int K>
  __device__ __forceinline__ void reduce(float (&x)[K]) { block_reduce<MAX>(x, sm); }
  __device__ __forceinline__ float sum(float x) { return block_sum(x, sm); }
  __device__ __forceinline__ bool leader() const { return true; }
};

#if KD_HAS_CLUSTERS
// The CTA's result of each reduction goes to its own slots of `xch` (shared memory; taken in
// call order, the same in every CTA of the cluster, each used once per row); after one cluster
// barrier lane i of every warp reads CTA i's slots and a butterfly over the C lanes combines them
// (max and + commute: every lane, so every CTA, ends with the same values, bitwise).
struct ClusterReduce {
  float* sm;
  float* xch;  // ClusterLayout::XCH floats
  int used;
  unsigned size, rank;
  template <bool MAX, int K>
  __device__ __forceinline__ void reduce(float (&x)[K]) {
    block_reduce<MAX>(x, sm);
    float* slot = xch + used;
    used += K;
    if (threadIdx.x == 0)
#pragma unroll
      for (int k = 0; k < K; ++k) slot[k] = x[k];
    cluster_sync();
    const float* src = cluster_map(slot, threadIdx.x & (size - 1));
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = src[k];
#pragma unroll
    for (unsigned off = 1; off < 16; off <<= 1) {  // unrolled: straight-line code; C <= 16
      if (off >= size) break;
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = combine<MAX>(x[k], __shfl_xor_sync(0xffffffffu, x[k], (int)off));
    }
  }
  __device__ __forceinline__ float sum(float x) {  // as block_sum: an exact zero as +0
    float v[1] = {x};
    reduce<false>(v);
    return v[0] + 0.f;
  }
  __device__ __forceinline__ bool leader() const { return rank == 0; }
};
#endif

// A row's probabilities e^{(x - m) / T - lz} from its normaliser, as 2^{(x - m) l2 - lz2} with
// log2(e) folded into l2 = log2(e) / T and lz2 = log2(e) lz once per row: a subtraction, one FMA
// and the MUFU's ex2 per element (e^{lp} took another multiply by log2(e)).
struct Prob2 {
  float m, l2, lz2;
  __device__ __forceinline__ float arg(float x) const { return (x - m) * l2 - lz2; }  // log2 of the probability
  __device__ __forceinline__ float operator()(float x) const { return exp2_dev(arg(x)); }
};
__device__ __forceinline__ Prob2 prob2(LogNorm n, float invT) { return Prob2{n.m, invT * kLog2e, n.lz * kLog2e}; }

// The second pass of the two-pass divergences from row normalisers na, nb: D = sum phi and
// c = sum q g over the row, in every thread (forward_kernel and given_stats_kernel).
// c adds q g terms as large as |log p| (4e4 for one-hot teachers at |logits| 1e4) that
// q (g - c) cancels: each thread sums a chunk (N terms) in fp32 and carries double only
// across its chunks (2 double adds per chunk, not per element); the tree over threads is
// short and stays fp32.
template <class S, int DIV, bool LIN, class Cols, class Red>
__device__ __forceinline__ void row_sums(const Cols& cs, const Cols& ct, int64_t j0, int64_t end, LogNorm na,
                                         LogNorm nb, float invT, float param, Red& red, float& D, float& cc) {
  constexpr int N = Vec<S>::N;
  const Prob2 pa = prob2(na, invT), pb = prob2(nb, invT);
  constexpr bool JSD_LOG2 = LIN && DIV == JSD;
  const float wp = param * kLn2, wq = (1.0f - param) * kLn2;
  double sphi = 0., sqg = 0.;
  for (int64_t j = j0; j < end; j += (int64_t)THREADS * N) {
    float sv[N], tv[N];
    cs.load(j, sv);
    ct.load(j, tv);
    float cphi = 0.f, cqg = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float lp2 = pa.arg(tv[k]), lq2 = pb.arg(sv[k]);
      const float p = exp2_dev(lp2), q = exp2_dev(lq2);
      float phi, qg;  // jsd's linear form: tp and tq (kd_math.h), weighted per chunk below
      if constexpr (JSD_LOG2)
        jsd_terms_log2(p, q, lp2, lq2, param, phi, qg);
      else if (LIN)
        mix_terms_linear<DIV>(p, q, param, phi, qg);
      else
        div_terms<DIV>(log_prob_scaled(tv[k], na, invT), log_prob_scaled(sv[k], nb, invT), p, q, param, phi, qg);
      cphi += phi;
      cqg += qg;
    }
    if constexpr (JSD_LOG2) {  // phi = beta ln2 tp + (1 - beta) ln2 tq, q g = (1 - beta) ln2 tq
      cqg *= wq;
      cphi = wp * cphi + cqg;
    }
    sphi += (double)cphi;
    sqg += (double)cqg;
  }
  float v[2] = {(float)sphi, (float)sqg};
  red.template reduce<false>(v);
  D = v[0];
  cc = v[1];
}

// The row's states from the threads' (SOFT: the soft term's `on`, SEP: the hard term's `os`), in
// every thread: the maxima are reduced first, each thread re-centres its sums on them (absorb,
// the rescaling a merge does), then the sums are reduced. Two reductions of at most 3 and 4
// floats, where merging whole states over the tree paid a rescaling per level (exponentials,
// selects) in every warp.
// MAXIMA false: the states are centred on the row's maxima already (forward_row's RowMaxima).
// DIV: the state's tag (REVERSE_KL_FIXED for the fused reverse KL, kd_math.h).
template <bool SOFT, bool SEP, bool MAXIMA, int DIV, class Red>
__device__ __forceinline__ void merge_row_state(Red& red, RawOnlineKL<DIV>& on, MaxSum& os) {
  // with the soft term the hard term's maximum is the soft term's of s (forward_row): not reduced twice
  constexpr int NM = !MAXIMA ? 0 : SOFT ? 2 : (SEP ? 1 : 0);
  constexpr int NZ = (SOFT ? (has_numerator(DIV) ? 3 : 2) : 0) + (SEP ? 1 : 0);
  if constexpr (NM > 0) {
    float m[NM];
    if constexpr (SOFT) {
      m[0] = on.k.ma;
      m[1] = on.k.mb;
    }
    if constexpr (SEP && !SOFT) m[0] = os.m;
    red.template reduce<true>(m);  // fmaxf: the maxima are never NaN (fmaxf over the chunks)
    if constexpr (SEP) {
      os.z *= rescale(os.m, m[NM - 1]);
      os.m = m[NM - 1];
    }
    if constexpr (SOFT) on.absorb(m[0], m[1], 0.f, 0.f, 0.f);
  }
  if constexpr (NZ > 0) {
    float z[NZ];
    if constexpr (SOFT) {
      z[0] = on.k.za;
      z[1] = on.k.zb;
      if constexpr (has_numerator(DIV)) z[2] = on.k.acc;
    }
    if constexpr (SEP) z[NZ - 1] = os.z;
    red.template reduce<false>(z);
    if constexpr (SOFT) {
      on.k.za = z[0];
      on.k.zb = z[1];
      if constexpr (has_numerator(DIV)) on.k.acc = z[2];
    }
    if constexpr (SEP) os.z = z[NZ - 1];
  }
}

// Row r's label (0 without labels). Read where it is used (the forward's epilogue, the gradient
// pass) rather than kept live across the passes: ptxas kept that 64-bit value on the stack in
// some variants (4-16 byte spills).
__device__ __forceinline__ int64_t row_label(const RowsArgs& a, int64_t r) { return a.labels ? a.labels[r] : 0; }

// This thread's sum of f(s_j, t_j) over its chunks from j0 to `end` (the re-sums of reverse KL's
// c: forward_row's far centres, backward_row's c'), fp32 in column order.
template <class S, class Cols, class F>
__device__ __forceinline__ float thread_sum(const Cols& cs, const Cols& ct, int64_t j0, int64_t end, F f) {
  constexpr int N = Vec<S>::N;
  float part = 0.f;
  for (int64_t j = j0; j < end; j += (int64_t)THREADS * N) {
    float sv[N], tv[N];
    cs.load(j, sv);
    ct.load(j, tv);
#pragma unroll
    for (int k = 0; k < N; ++k) part += f(sv[k], tv[k]);
  }
  return part;
}

// A row's columns as forward_row / backward_row read them from global memory: the student row
// `s`, its peeled head and vector switches (see the file comment).
template <class S>
struct RowView {
  const S* s;
  const S* t;
  GlobalCols<S> cs, ct;
  int64_t j0;  // this thread's first chunk
};
// The offset of row r = (b, l) of a [B, L] split, b * stride_b + l * stride_l: with 32-bit
// unsigned division (r < N < 2^31 and 1 <= L <= N: dispatch checks), where int64 division left a
// subroutine call in every row kernel whose calling convention made ptxas keep live values on
// the stack (4-16 byte spills in forward_kernel / forward_grad_kernel variants).
__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t L, int64_t stride_b, int64_t stride_l) {
  const uint32_t rr = (uint32_t)r, LL = (uint32_t)L, b = rr / LL;
  return (int64_t)b * stride_b + (int64_t)(rr - b * LL) * stride_l;
}

template <class S>
__device__ __forceinline__ RowView<S> row_view(const RowsArgs& a, int64_t r) {
  const S* s = static_cast<const S*>(a.student) + row_offset(r, a.L, a.s_stride_b, a.s_stride_l);
  const S* t = static_cast<const S*>(a.teacher) + row_offset(r, a.t_L, a.t_stride_b, a.t_stride_l);
  const bool vs = vector_ok<S>(s), vt = vs && same_phase(s, t);
  return RowView<S>{s, t, GlobalCols<S>{s, a.V, vs}, GlobalCols<S>{t, a.V, vt}, first_chunk<S>(head_of<S>(s))};
}

// SOFT: the soft term counts (soft_weight != 0). SEP: the hard term needs its own (max, sum-exp)
// of s at T = 1 (labels, hard_weight != 0, and not (SOFT and T == 1), where it is the student's).
// The forward of one counted row (every thread of the CTA): thread 0 writes its loss to a.loss[r]
// and its statistics to `st` (forward_kernel: the stats row; forward_grad_kernel: shared memory),
// nothing is returned: statistics returned in registers made ptxas spill 4 bytes in
// forward_kernel / forward_grad_kernel<16-bit, forward_kl, soft, sep(, hard)>. `sm`: the CTA's
// reduction scratch. `a` is taken by value (nvcc 13: by reference, or the row's view formed
// again for the gradient pass, spilled 4-16 bytes in some variants; so did the label kept live
// across the passes, now read where it is used: row_label).
// Mx: RunningMaxima (the maxima found by the statistics pass itself) or RowMaxima (the row's
// maxima of t and s known before it: cluster_grad_kernel, from its copy; then the sums are taken
// against them from the start, with no re-centring per chunk, the same sums as re-centring on
// them would give).
// FIXED (reverse KL in the training kernels): the numerator on the fixed centres `cen` of s and t
// (kd_math.h reverse_kl_fixed_*): acc = sum e^{(s - mb) / T} x, x = (s - cs) - (t - ct), and the
// row's c = acc / zb, which the gradient pass subtracts from the same x (no c' pass); a row whose
// centres are far from its maxima (reverse_kl_centres_far) re-centres on them and sums c once
// more here (one more read of that row). Thread 0 stores the centres used after the statistics
// (st[STAT_CS], st[STAT_CT]: FUSED_STATS_WIDTH floats).
struct RunningMaxima {};
struct RowMaxima {
  float t, s;
};
struct Centres {
  float s, t;
};
enum FusedStatsCol : int { STAT_CS = STATS_WIDTH, STAT_CT = STATS_WIDTH + 1, FUSED_STATS_WIDTH = STATS_WIDTH + 2 };
template <class S, int DIV, bool SOFT, bool SEP, bool LIN, bool FIXED, class Cols, class Red,
          class Mx = RunningMaxima>
__device__ __forceinline__ void forward_row(RowsArgs a, int64_t r, const S* s, const Cols& cs, const Cols& ct,
                                            int64_t j0, int64_t end, Red& red, float* st, Centres cen = Centres{},
                                            Mx mx = Mx{}) {
  constexpr int N = Vec<S>::N;
  constexpr bool KNOWN = std::is_same<Mx, RowMaxima>::value;
  static_assert(!KNOWN || SOFT, "the row's maxima are known with the soft term");
  static_assert(!FIXED || (SOFT && DIV == REVERSE_KL), "fixed centres: reverse KL's soft term");
  constexpr int SD = FIXED ? REVERSE_KL_FIXED : DIV;  // the state's tag
  constexpr bool NUM = has_numerator(SD);
  const bool hard = a.labels && a.hard_weight != 0.f;
  const float invT = 1.0f / a.temperature, l2 = invT * kLog2e;

  // Per thread: each chunk's sums are taken against the raised running maxima and absorbed (as
  // the CPU kernel does per block); then the row's state from the threads' (merge_row_state).
  RawOnlineKL<SD> on;
  MaxSum os;
  on.init(invT);
  os.init();
  if constexpr (KNOWN) {
    on.k.ma = mx.t;
    on.k.mb = os.m = mx.s;
  }
  for (int64_t j = j0; j < end; j += (int64_t)THREADS * N) {
    float sv[N], tv[N];
    cs.load(j, sv);
    float nms = kNegInf;  // SOFT: the student's raised running maximum, the hard term's too
    if (SOFT) {
      ct.load(j, tv);
      float nma = on.k.ma, nmb = on.k.mb;
      if constexpr (!KNOWN) {
        float bma = kNegInf, bmb = kNegInf;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          bma = fmaxf(bma, tv[k]);
          bmb = fmaxf(bmb, sv[k]);
        }
        nma = raise_max(nma, bma);
        nmb = raise_max(nmb, bmb);
      }
      const float offa = safe_max(nma), offb = safe_max(nmb);
      nms = nmb;
      // For forward / reverse KL the state is re-centred first and the sum-exps added into it;
      // the exponents are in log2 units (l2 = log2(e) / T: e^{(x - off) / T} = 2^{(x - off) l2}),
      // so the chunk's online KL numerator is summed apart and joins the state times ln 2 (FIXED:
      // in raw logit units, as it is).
      float za = 0.f, zb = 0.f, acc2 = 0.f;
      if (NUM && !KNOWN) on.absorb(nma, nmb, 0.f, 0.f, 0.f);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float ca = (tv[k] - offa) * l2, cb = (sv[k] - offb) * l2;  // shift, then scale
        const float ea = exp2_dev(ca), eb = exp2_dev(cb);
        if (NUM) {
          on.k.za += ea;
          on.k.zb += eb;
          if constexpr (FIXED)
            acc2 += reverse_kl_fixed_term(eb, reverse_kl_x(sv[k], tv[k], cen.s, cen.t));
          else
            acc2 += online_kl_term<DIV>(ca, cb, 0.f, 0.f, ea, eb);
        } else {
          za += ea;
          zb += eb;
        }
      }
      if (NUM) {
        on.k.acc += FIXED ? acc2 : acc2 * kLn2;
      } else if (KNOWN) {
        on.k.za += za;
        on.k.zb += zb;
      } else {
        on.absorb(nma, nmb, za, zb, 0.f);
      }
    }
    if (SEP) {
      // os.m runs over the same columns as the soft term's on.k.mb (both from -inf by
      // raise_max): with the soft term, its raised maximum (and so s - off) is the same value
      float nm = nms;
      if (!SOFT) {
        float bm = kNegInf;
#pragma unroll
        for (int k = 0; k < N; ++k) bm = fmaxf(bm, sv[k]);
        nm = raise_max(os.m, bm);
      }
      if (!KNOWN) os.z *= rescale(os.m, nm);
      os.m = nm;
      const float off = safe_max(nm);
#pragma unroll
      for (int k = 0; k < N; ++k) os.z += exp_fast(sv[k] - off);
    }
  }
  merge_row_state<SOFT, SEP, !KNOWN>(red, on, os);
  LogNorm na{0.f, 0.f}, nb{0.f, 0.f};
  float cc = 0.f, D = 0.f;
  if (SOFT) {
    na = lognorm_from(on.k.ma, on.k.za);
    nb = lognorm_from(on.k.mb, on.k.zb);
    if (DIV == FORWARD_KL) {
      D = on.k.divergence();
      cc = -1.f;
    } else if (FIXED) {
      float c = on.k.acc / on.k.zb;  // E_q[x]
      if constexpr (!KNOWN) {  // (KNOWN: the centres are the maxima)
        if (reverse_kl_centres_far(na.m, nb.m, cen.s, cen.t, invT)) {  // the same in every thread
          cen = Centres{nb.m, na.m};
          const Prob2 pb = prob2(nb, invT);
          c = red.sum(thread_sum<S>(cs, ct, j0, end, [&](float x, float y) {
            return reverse_kl_fixed_term(pb(x), reverse_kl_x(x, y, cen.s, cen.t));
          }));
        }
      }
      D = reverse_kl_fixed_divergence(c, na.m, nb.m, cen.s, cen.t, invT, on.k.za, on.k.zb);
      cc = c;
    } else if (DIV == REVERSE_KL) {
      D = on.k.divergence();
      cc = D + 1.f;  // saved for the record; backward sums its own c' (backward_kernel)
    } else {
      row_sums<S, DIV, LIN>(cs, ct, j0, end, na, nb, invT, a.param, red, D, cc);
      if (lognorm_nan(na) || lognorm_nan(nb)) D = NAN;  // NaN input: terms with q = NaN read as 0
    }
  }
  LogNorm ns = nb;
  if (SEP) ns = lognorm_from(os.m, os.z);
  if (threadIdx.x == 0) {
    const int64_t label = row_label(a, r);
    const bool bad_label = hard && (label < 0 || label >= a.V);
    const float ce = !hard ? 0.f : bad_label ? NAN : hard_ce(ns, to_float(s[label]));
    if (red.leader()) a.loss[r] = row_loss(SOFT, a.soft_weight, a.temperature, D, hard, a.hard_weight, ce);
    store_row_stats(st, RowStats{na, nb, cc, ns});
    if (FIXED) {
      st[STAT_CS] = cen.s;
      st[STAT_CT] = cen.t;
    }
  }
}

// Forward reduction scratch: K * WARPS floats for the largest reduction (merge_row_state's K <= 4).
template <int DIV>
struct FwdScratch {
  static constexpr int FLOATS = sizeof(RawOnlineKL<DIV>) / sizeof(float) * WARPS;
  static_assert(FLOATS >= 4 * WARPS, "reduction scratch");
};

// __launch_bounds__(THREADS, 3): up to 80 registers (ptxas took 40 by its own occupancy choice
// and spilled 4 bytes in the <fp16, forward / reverse KL, soft, no sep> variants on sm_80; a cap
// of 64 spilled jsd's log-space form on sm_90).
template <class S, int DIV, bool SOFT, bool SEP, bool LIN>
__global__ void __launch_bounds__(THREADS, 3) forward_kernel(RowsArgs a) {
  __shared__ float sm[FwdScratch<DIV>::FLOATS];  // block reductions
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
  const RowView<S> v = row_view<S>(a, r);
  CtaReduce red{sm};
  forward_row<S, DIV, SOFT, SEP, LIN, false>(a, r, v.s, v.cs, v.ct, v.j0, a.V, red, st);
}

// Writes v over this thread's chunks of one gradient row, from j0 to end (stores bounded by V).
template <class S>
__device__ __forceinline__ void fill_row(S* g, int64_t j0, int64_t end, int64_t V, bool vec, float v) {
  constexpr int N = Vec<S>::N;
  float b[N];
#pragma unroll
  for (int k = 0; k < N; ++k) b[k] = v;
  for (int64_t j = j0; j < end; j += (int64_t)THREADS * N) store_chunk(g, j, V, vec, b);
}

// Zeros over the gradient row of an ignored row.
template <class S>
__device__ __forceinline__ void zero_grad_row(const RowsArgs& a, int64_t r) {
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const S* s = static_cast<const S*>(a.student) + row_offset(r, a.L, a.s_stride_b, a.s_stride_l);
  fill_row(g, first_chunk<S>(head_of<S>(s)), a.V, a.V, vector_ok<S>(s) && same_phase(s, g), 0.f);
}

// SOFT as in forward_kernel; HARD: labels and hard_weight != 0 (the hard term's gradient).
// The gradient pass of one counted row from its statistics `rs`, for grad_loss `gl` (every
// thread of the CTA; of the cluster: cluster_grad_kernel) into the gradient row `g` (vector
// stores when vg), columns as in forward_row. red: at least WARPS floats of reduction scratch.
// FIXED: reverse KL with rs.c = E_q[x] on the centres `cen` (forward_row's FIXED): no c' pass.
template <class S, int DIV, bool SOFT, bool HARD, bool LIN, bool FIXED, class Cols, class Red>
__device__ __forceinline__ void backward_row(const RowsArgs& a, int64_t label, const RowStats& rs, float gl, S* g,
                                             bool vg, const Cols& cs, const Cols& ct, int64_t j0, int64_t end,
                                             Red& red, Centres cen = Centres{}) {
  static_assert(!FIXED || (SOFT && DIV == REVERSE_KL), "fixed centres: reverse KL's soft term");
  constexpr int N = Vec<S>::N;
  const int64_t V = a.V;
  const bool sep = HARD && (!SOFT || a.temperature != 1.f);
  const LogNorm na = rs.na, nb = rs.nb, ns = rs.ns;
  const float invT = 1.0f / a.temperature;
  float cc = rs.c;
  // reverse KL: log q - log p = (cb - ca) - (lzb - lza), the constant formed once in double
  const float krev = DIV == REVERSE_KL && !FIXED ? reverse_kl_offset(na.lz, nb.lz) : 0.f;
  const Prob2 pa = prob2(na, invT), pb = prob2(nb, invT), ps = prob2(ns, 1.f);  // p, q; softmax(s)
  if (DIV == REVERSE_KL && SOFT && !FIXED) {
    // Reverse KL: d/db_j = q_j (x_j - c') with c' = sum_k q_k x_k summed here from the same
    // rounded x_k as the gradient (kd_math.h reverse_kl_qx / reverse_kl_qg, as the CPU kernel):
    // one more read of the row.
    cc = red.sum(thread_sum<S>(cs, ct, j0, end, [&](float x, float y) {
      return reverse_kl_qx(pb(x), (y - na.m) * invT, (x - nb.m) * invT, krev);
    }));
  }
  if (SOFT && !grad_defined(cc)) {  // the same value in every thread: a uniform branch
    fill_row(g, j0, end, V, vg, NAN);  // an infinite term in the gradient (docs/precision.md)
    return;
  }
  const float k_soft = SOFT ? gl * a.soft_weight * a.temperature : 0.f;
  // A label outside [0, V) that is not ignore_index (its column lives on another rank of a
  // vocab-parallel group) adds the softmax term and no one-hot; its forward loss is NaN.
  const float k_hard = HARD ? gl * a.hard_weight : 0.f;
  const float kj = k_soft * ((1.0f - a.param) * kLn2), kc = k_soft * cc;  // jsd's linear form
  // The gradient of one column from its logits x (student), y (teacher); `one`: the label's
  // column, whose hard term subtracts the one-hot.
  auto grad_of = [&](float x, float y, bool one) -> float {
    float o = 0.f, q = 0.f;
    if (SOFT) {
      const float ca = (y - na.m) * invT, cb = (x - nb.m) * invT;
      const float lp = ca - na.lz, lq = cb - nb.lz;
      const float lp2 = pa.arg(y), lq2 = pb.arg(x);
      const float p = exp2_dev(lp2);
      q = exp2_dev(lq2);
      float phi, qg;
      if constexpr (LIN && DIV == JSD) {  // q g = (1 - beta) ln2 tq: k_soft q g - k_soft c q, per-row factors
        jsd_terms_log2(p, q, lp2, lq2, a.param, phi, qg);
        o = kj * qg - kc * q;
      } else {
        if (LIN)
          mix_terms_linear<DIV>(p, q, a.param, phi, qg);
        else
          div_terms<DIV>(lp, lq, p, q, a.param, phi, qg);
        // reverse KL: qg - q c = q (x - c') without the cancellation (kd_math.h)
        if constexpr (FIXED)
          o = k_soft * reverse_kl_fixed_qg(q, reverse_kl_x(x, y, cen.s, cen.t), cc, invT);
        else
          o = DIV == REVERSE_KL ? k_soft * reverse_kl_qg(q, ca, cb, krev, cc) : k_soft * (qg - q * cc);
      }
    }
    if (HARD) {
      const float sm1 = sep ? ps(x) : q;
      o += k_hard * (one ? sm1 - 1.f : sm1);
    }
    return o;
  };
  for (int64_t j = j0; j < end; j += (int64_t)THREADS * N) {
    float sv[N], tv[N], out[N];
    cs.load(j, sv);
    if (SOFT) ct.load(j, tv);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = grad_of(sv[k], SOFT ? tv[k] : 0.f, false);
    store_chunk(g, j, V, vg, out);
  }
  // The label's column again, with the one-hot, by the one thread whose chunks hold it (it
  // stored the column above; its own later store wins): no compare and select per element.
  // The chunks from j0 in steps of THREADS * N (a power of two), before `end`, [0, V).
  if (HARD && label >= 0 && label < V) {
    const int64_t d = label - j0, at = d & ((int64_t)THREADS * N - 1);
    if (d >= 0 && at < N && label - at < end)
      g[label] = from_float<S>(grad_of(cs.at(label), SOFT ? ct.at(label) : 0.f, true));
  }
}

template <class S, int DIV, bool SOFT, bool HARD, bool LIN>
__global__ void __launch_bounds__(THREADS) backward_kernel(RowsArgs a) {
  __shared__ float sm[WARPS];
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t label = a.labels ? a.labels[r] : 0;
  if (a.labels && label == a.ignore_index) {
    zero_grad_row<S>(a, r);
    return;
  }
  const RowView<S> v = row_view<S>(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  CtaReduce red{sm};
  backward_row<S, DIV, SOFT, HARD, LIN, false>(a, label, load_row_stats(a.stats + r * STATS_WIDTH), a.grad_loss[r], g,
                                               vector_ok<S>(v.s) && same_phase(v.s, g), v.cs, v.ct, v.j0, a.V, red);
}

// The fixed centres of reverse KL's training kernel (forward_row's FIXED), in every thread: the
// maxima of s and t over the row's first THREADS * N columns (each thread's first chunk, read
// again by the statistics pass), 0 where not finite. Centres near the row's likely tokens keep
// the rounding of x = (s - cs) - (t - ct) small; a first chunk far below them (reverse_kl_centres_far)
// costs that row one more read (forward_row).
template <class S, class Cols, class Red>
__device__ __forceinline__ Centres first_chunk_centres(const Cols& cs, const Cols& ct, int64_t j0, Red& red) {
  constexpr int N = Vec<S>::N;
  float sv[N], tv[N];
  cs.load(j0, sv);  // -inf outside [0, V)
  ct.load(j0, tv);
  float m[2] = {kNegInf, kNegInf};
#pragma unroll
  for (int k = 0; k < N; ++k) {
    m[0] = fmaxf(m[0], sv[k]);
    m[1] = fmaxf(m[1], tv[k]);
  }
  red.template reduce<true>(m);
  return Centres{fabsf(m[0]) < kInf ? m[0] : 0.f, fabsf(m[1]) < kInf ? m[1] : 0.f};
}

// The training path in one kernel: the forward of the row (statistics pass, and the loss / c pass
// of the mixture divergences), then its gradient pass for grad_loss = grad_scale (a.grad_loss),
// the statistics handed over in shared memory (7 floats, not a global round trip): the loss is
// forward_kernel's and the gradient backward_kernel's, bitwise, but for reverse KL, which takes
// the fixed-centres form (forward_row's FIXED; the centres are 2 more floats): 2 passes and
// 10 B/element where forward_kernel + backward_kernel's c' pass take 3 and 14, the same values to
// the error bound. SOFT, SEP as in forward_kernel, HARD as in backward_kernel.
template <class S, int DIV, bool SOFT, bool SEP, bool HARD, bool LIN>
__global__ void __launch_bounds__(THREADS) forward_grad_kernel(RowsArgs a) {
  constexpr bool FIXED = SOFT && DIV == REVERSE_KL;  // reverse KL on fixed centres: 10 B/element
  __shared__ float sm[FwdScratch<DIV>::FLOATS];
  __shared__ float st[FUSED_STATS_WIDTH];
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t label = a.labels ? a.labels[r] : 0;
  if (a.labels && label == a.ignore_index) {
    if (threadIdx.x == 0) a.loss[r] = 0.f;
    zero_grad_row<S>(a, r);
    return;
  }
  const RowView<S> v = row_view<S>(a, r);
  CtaReduce red{sm};
  Centres cen{0.f, 0.f};
  if constexpr (FIXED) cen = first_chunk_centres<S>(v.cs, v.ct, v.j0, red);
  forward_row<S, DIV, SOFT, SEP, LIN, FIXED>(a, r, v.s, v.cs, v.ct, v.j0, a.V, red, st, cen);
  __syncthreads();  // thread 0's statistics, as backward_kernel loads them from the stats row
  if constexpr (FIXED) cen = Centres{st[STAT_CS], st[STAT_CT]};  // re-centred where far
  S* g = static_cast<S*>(a.grad) + r * a.V;
  backward_row<S, DIV, SOFT, HARD, LIN, FIXED>(a, row_label(a, r), load_row_stats(st), a.grad_loss[r], g,
                                               vector_ok<S>(v.s) && same_phase(v.s, g), v.cs, v.ct, v.j0, a.V, red,
                                               cen);
}

// ---- the training path with the row on chip: thread-block clusters (compute capability 9.0) ----
// One cluster of C CTAs per row (C = 1 .. 16, launch_cluster_grad): CTA `rank` copies its slice
// of the row's chunks (`per` chunks of N columns, of s and of t) from global memory into shared
// memory once, and every pass (statistics; the loss / c pass of the mixtures; the gradient)
// reads the slice from there (reverse KL: on the row's maxima as fixed centres, forward_row's
// FIXED, no c' pass). The passes' partial results are merged over the
// cluster through distributed shared memory (ClusterReduce: one cluster barrier per reduction).
// Global traffic per element: the row read once and the gradient written once (6 bytes in bf16
// where forward_grad_kernel moves 10, or 14 for the mixtures). The row's maxima of
// s and t are taken during the copy (RawMax) and reduced over the cluster, so the statistics pass
// sums against them from the start (forward_row's RowMaxima: no re-centring per chunk, and no
// maxima to reduce after it). The math is otherwise
// forward_grad_kernel's, pass by pass; the summation tree over the row differs (per CTA,
// then over the cluster in rank order). The soft term counts (SOFT); SEP, HARD as there.
//
// Shared memory (all of it dynamic: a kernel launched in clusters keeps none in `static`
// __shared__, which the host emulation could not give each CTA of a cluster): the reduction
// scratch, the exchange slots, the statistics, then the s and t slices.
template <int DIV>
struct ClusterLayout {
  static constexpr int XCH = 32;  // exchange slots, floats: >= the reductions' sizes of one row
  static constexpr int SCRATCH = FwdScratch<DIV>::FLOATS;
  static constexpr int HEAD = (SCRATCH + XCH + FUSED_STATS_WIDTH + 3) / 4 * 4;  // floats, 16-byte multiple
  // the copy's maxima (2), merge_row_state's sums (<= 4), row_sums' 2
  static_assert(2 + 4 + 2 <= XCH, "exchange slots");
};
template <int DIV>
size_t cluster_smem_bytes(int64_t per) {
  return (size_t)ClusterLayout<DIV>::HEAD * sizeof(float) + 2 * (size_t)per * 16;
}

// Columns [j, j + N) of a row as 16 bytes in the row's own dtype (load_chunk without the fp32
// conversion, for the copy into shared memory): one 16-byte load when `vec` and the chunk lies in
// [0, V), else bounded scalar loads, -inf outside.
template <class S>
__device__ __forceinline__ uint4 load_raw(const S* row, int64_t j, int64_t V, bool vec) {
  constexpr int N = Vec<S>::N;
  if (vec && j >= 0 && j + N <= V) return *reinterpret_cast<const uint4*>(row + j);
  uint4 raw;
  S* e = reinterpret_cast<S*>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) e[k] = (j + k >= 0 && j + k < V) ? row[j + k] : from_float<S>(kNegInf);
  return raw;
}

template <class S, int DIV, bool SEP, bool HARD, bool LIN>
__global__ void __launch_bounds__(THREADS, 3) cluster_grad_kernel(RowsArgs a, int per) {
#if KD_HAS_CLUSTERS
  constexpr int N = Vec<S>::N;
  using L = ClusterLayout<DIV>;
  float* sm = dynamic_smem();
  float* xch = sm + L::SCRATCH;
  float* st = xch + L::XCH;
  S* s_sl = reinterpret_cast<S*>(sm + L::HEAD);
  S* t_sl = s_sl + (int64_t)per * N;
  const unsigned C = cluster_size(), rank = cluster_rank();
  const int64_t r = blockIdx.x / C;  // the grid is N * C CTAs: r < a.N
  const int64_t label = a.labels ? a.labels[r] : 0;
  const int64_t V = a.V;
  const RowView<S> v = row_view<S>(a, r);
  S* g = static_cast<S*>(a.grad) + r * V;
  const bool vg = vector_ok<S>(v.s) && same_phase(v.s, g);
  // this CTA's slice: chunks [rank * per, (rank + 1) * per) of the row's (forward_grad_kernel's)
  const int64_t lo = v.j0 - (int64_t)threadIdx.x * N + (int64_t)rank * per * N, hi = lo + (int64_t)per * N;
  const int64_t j0 = lo + (int64_t)threadIdx.x * N;
  if (a.labels && label == a.ignore_index) {  // the whole cluster: no shared memory read across
    if (rank == 0 && threadIdx.x == 0) a.loss[r] = 0.f;
    fill_row(g, j0, hi, V, vg, 0.f);
    return;
  }
  // the copy, 4 chunks of each row in flight per thread, and the row's maxima of s and t taken
  // on the way (RawMax: the columns outside [0, V) are -inf), so the statistics pass has its
  // offsets from the start
  RawMax<S> mxs, mxt;
  mxs.init();
  mxt.init();
  for (int k0 = threadIdx.x; k0 < per; k0 += 4 * THREADS) {
    uint4 rs[4], rt[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k = k0 + u * THREADS;
      if (k < per) {
        rs[u] = load_raw(v.s, lo + (int64_t)k * N, V, v.cs.vec);
        rt[u] = load_raw(v.t, lo + (int64_t)k * N, V, v.ct.vec);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k = k0 + u * THREADS;
      if (k < per) {
        *reinterpret_cast<uint4*>(s_sl + (int64_t)k * N) = rs[u];
        *reinterpret_cast<uint4*>(t_sl + (int64_t)k * N) = rt[u];
        mxs.add(rs[u]);
        mxt.add(rt[u]);
      }
    }
  }
  ClusterReduce red{sm, xch, 0, C, rank};
  float m[2] = {mxt.value(), mxs.value()};
  red.template reduce<true>(m);  // its first barrier also ends the copy
  const SharedCols<S> cs{s_sl, lo}, ct{t_sl, lo};
  // reverse KL: the numerator on the row's maxima as fixed centres (forward_row's FIXED; never far)
  constexpr bool FIXED = DIV == REVERSE_KL;
  const Centres cen{safe_max(m[1]), safe_max(m[0])};  // the statistics' offsets, nb.m and na.m
  forward_row<S, DIV, true, SEP, LIN, FIXED>(a, r, v.s, cs, ct, j0, hi, red, st, cen, RowMaxima{m[0], m[1]});
  __syncthreads();  // thread 0's statistics
  backward_row<S, DIV, true, HARD, LIN, FIXED>(a, row_label(a, r), load_row_stats(st), a.grad_loss[r], g, vg, cs, ct,
                                               j0, hi, red, cen);
  cluster_sync();  // no CTA exits while another may still read its exchange slots
#endif
}

// KDKERNELS_CUDA_CLUSTER_BYTES: the shared memory a CTA of cluster_grad_kernel may take (bytes,
// read at every launch; default 72 KiB: three CTAs per SM); 0 turns the cluster path off.
inline long cluster_budget() {
  constexpr long kDefault = 72L * 1024;
  const char* e = getenv("KDKERNELS_CUDA_CLUSTER_BYTES");
  if (!e || !*e) return kDefault;
  char* end = nullptr;
  const long v = strtol(e, &end, 10);
  return (end && *end == '\0' && v >= 0) ? v : kDefault;
}

// The cluster path of the training step when it applies: the soft term counts, the device has
// clusters (compute capability >= 9) and the row's slices fit the budget in at most 16 CTAs (the
// smallest such power of two is taken). Returns -1 (nothing launched, no error left) when it
// does not apply or the launch is refused, so that forward_grad_kernel runs instead.
template <class S, int DIV, bool LIN>
int launch_cluster_grad(const RowsArgs& a, cudaStream_t stream) {
  const bool soft = a.soft_weight != 0.f;
  if (!soft || a.N == 0) return -1;
  const long budget = cluster_budget();
  if (budget == 0) return -1;
  int dev = 0, major = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  if (major < 9) return -1;
  constexpr int N = Vec<S>::N;
  const int64_t chunks = (a.V + N - 1) / N + 1;  // a peeled head adds at most one
  unsigned C = 0;
  int64_t per = 0;
  for (unsigned c = 1; c <= 16; c *= 2) {
    const int64_t p = (chunks + c - 1) / c;
    const size_t bytes = cluster_smem_bytes<DIV>(p);
    if (bytes <= (size_t)budget && bytes <= (size_t)optin) {
      C = c;
      per = p;
      break;
    }
  }
  if (C == 0 || (int64_t)a.N * C > 0x7fffffffLL) return -1;
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool sep = hard && a.temperature != 1.f;
  void (*kernel)(RowsArgs, int) = !hard ? cluster_grad_kernel<S, DIV, false, false, LIN>
                                        : (sep ? cluster_grad_kernel<S, DIV, true, true, LIN>
                                               : cluster_grad_kernel<S, DIV, false, true, LIN>);
  const size_t bytes = cluster_smem_bytes<DIV>(per);
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // as in launch()
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess ||
      (C > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
    (void)cudaGetLastError();
    return -1;
  }
  dim3 grid((unsigned)(a.N * C)), block(THREADS);
  KD_LAUNCH_CLUSTER(kernel, grid, block, C, bytes, stream, a, (int)per);
  const int rc = (int)cudaGetLastError();
  // a configuration the device refuses (cluster size, shared memory) leaves nothing running
  return rc == (int)cudaErrorInvalidValue || rc == (int)cudaErrorInvalidConfiguration ||
                 rc == (int)cudaErrorNotSupported
             ? -1
             : rc;
}

// In place: grad[r] *= grad_loss[r] / grad_scale[r] (0 where grad_scale is 0; grad_scale null:
// ones), fp32 rounded once. A row whose ratio is exactly 1 returns at once: no bytes moved.
// Rows of `grad` at (r / L) * stride_b + (r % L) * stride_l, unit column stride.
template <class S>
__global__ void __launch_bounds__(THREADS) rescale_kernel(void* grad, const float* gl, const float* gs, int64_t N,
                                                          int64_t V, int64_t L, int64_t stride_b, int64_t stride_l) {
  const int64_t r = blockIdx.x;
  if (r >= N) return;
  const float d = gs ? gs[r] : 1.f;
  const float ratio = d != 0.f ? gl[r] / d : 0.f;
  if (ratio == 1.f) return;
  S* g = static_cast<S*>(grad) + (r / L) * stride_b + (r % L) * stride_l;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = from_float<S>(to_float(g[j]) * ratio);
}

// Vocab-parallel pass 2: with the normalisers given in a.stats (raw maxima, as forward stores
// them), the sums over the row's columns of phi and of q g into a.partial[2 r], a.partial[2 r + 1]
// (the second pass of forward_kernel); zeros on ignored rows.
template <class S, int DIV, bool LIN>
__global__ void __launch_bounds__(THREADS) given_stats_kernel(RowsArgs a) {
  __shared__ float sm[2 * WARPS];  // row_sums: a reduction of 2 floats
  const int64_t r = blockIdx.x;
  if (r >= a.N) return;
  const int64_t label = a.labels ? a.labels[r] : 0;
  float* out = a.partial + 2 * r;
  if (a.labels && label == a.ignore_index) {
    if (threadIdx.x == 0) out[0] = out[1] = 0.f;
    return;
  }
  const RowView<S> v = row_view<S>(a, r);
  const RowStats rs = load_row_stats(a.stats + r * STATS_WIDTH);
  const LogNorm na = rs.na, nb = rs.nb;
  float D, cc;  // forward_kernel's second pass, from the given statistics
  CtaReduce red{sm};
  row_sums<S, DIV, LIN>(v.cs, v.ct, v.j0, a.V, na, nb, 1.0f / a.temperature, a.param, red, D, cc);
  if (threadIdx.x == 0) {
    out[0] = (lognorm_nan(na) || lognorm_nan(nb)) ? NAN : D;
    out[1] = cc;
  }
}

template <class S, int DIV, bool LIN>
int launch_given_stats(const RowsArgs& a, cudaStream_t stream) {
  if (a.N == 0) return 0;
  dim3 grid((unsigned)a.N), block(THREADS);
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // as launch()
  void (*kernel)(RowsArgs) = given_stats_kernel<S, DIV, LIN>;  // no template commas in the macro
  KD_LAUNCH(kernel, grid, block, 0, stream, a);
  return (int)cudaGetLastError();
}

// The mixture divergences, whose terms have a linear form (LIN, launch_which).
constexpr bool has_linear_form(int div) { return div == JSD || div == SKEW_KL || div == SKEW_REVERSE_KL; }

template <class S, int DIV, bool LIN>
int launch_fused(const RowsArgs& a, cudaStream_t stream) {
  if (a.N == 0) return 0;
  // the row on chip where it applies (launch_cluster_grad); the mixtures in their linear form only
  if constexpr (LIN || !has_linear_form(DIV)) {
    const int rc = launch_cluster_grad<S, DIV, LIN>(a, stream);
    if (rc != -1) return rc;
  }
  const bool soft = a.soft_weight != 0.f;
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool sep = hard && !(soft && a.temperature == 1.f);
  void (*kernel)(RowsArgs);
  if (soft)
    kernel = !hard ? forward_grad_kernel<S, DIV, true, false, false, LIN>
                   : (sep ? forward_grad_kernel<S, DIV, true, true, true, LIN>
                          : forward_grad_kernel<S, DIV, true, false, true, LIN>);
  else  // no soft term: the divergence's terms are never formed
    kernel = hard ? forward_grad_kernel<S, DIV, false, true, true, false>
                  : forward_grad_kernel<S, DIV, false, false, false, false>;
  dim3 grid((unsigned)a.N), block(THREADS);
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // as in launch()
  KD_LAUNCH(kernel, grid, block, 0, stream, a);
  return (int)cudaGetLastError();
}

template <class S, int DIV, bool LIN>
int launch(const RowsArgs& a, cudaStream_t stream, bool fwd) {
  if (a.N == 0) return 0;
  const bool soft = a.soft_weight != 0.f;
  const bool hard = a.labels && a.hard_weight != 0.f;
  const bool sep = hard && !(soft && a.temperature == 1.f);
  void (*kernel)(RowsArgs);
  if (fwd)
    kernel = soft ? (sep ? forward_kernel<S, DIV, true, true, LIN> : forward_kernel<S, DIV, true, false, LIN>)
                  : (sep ? forward_kernel<S, DIV, false, true, false> : forward_kernel<S, DIV, false, false, false>);
  else
    kernel = soft ? (hard ? backward_kernel<S, DIV, true, true, LIN> : backward_kernel<S, DIV, true, false, LIN>)
                  : (hard ? backward_kernel<S, DIV, false, true, false> : backward_kernel<S, DIV, false, false, false>);
  dim3 grid((unsigned)a.N), block(THREADS);
  // An error left pending by an earlier, unrelated call is not this launch's: clear it first
  // (cudaPeekAtLastError / cudaGetLastError), so the check after the launch reports only the
  // launch's own error. A sticky error (a corrupted context) is not cleared by this and is
  // reported after the launch, which cannot have run.
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();
  KD_LAUNCH(kernel, grid, block, 0, stream, a);
  return (int)cudaGetLastError();
}

// logit_mse: its own kernels (launch_mse), on this file's helpers.
#include "mse_cuda.cuh"

// The kernel a launcher entry point runs.
enum Which { FORWARD = 0, BACKWARD = 1, FUSED = 2, GIVEN_STATS = 3 };

template <class S, int DIV, bool LIN>
int launch_which_form(const RowsArgs& a, cudaStream_t stream, int which) {
  switch (which) {
    case FUSED: return launch_fused<S, DIV, LIN>(a, stream);
    case GIVEN_STATS: return launch_given_stats<S, DIV, LIN>(a, stream);
    default: return launch<S, DIV, LIN>(a, stream, which == FORWARD);
  }
}

// LIN: the mixture divergences with a parameter >= 2^-60 (kd_math.h mix_linear_ok) form their
// terms from p and q in linear space (mix_terms_linear, as the CPU kernels): a division and a
// log per ratio (one for the skew divergences, two for jsd), where the log-space mixture takes
// exponentials and logs of its own.
template <class S, int DIV>
int launch_which(const RowsArgs& a, cudaStream_t stream, int which) {
  if constexpr (has_linear_form(DIV)) {  // no LIN kernels for the others
    if (mix_linear_ok(a.param)) return launch_which_form<S, DIV, true>(a, stream, which);
  }
  return launch_which_form<S, DIV, false>(a, stream, which);
}

template <class S>
int dispatch_div(const RowsArgs& a, cudaStream_t stream, int which) {
  switch (a.div) {
    case FORWARD_KL: return launch_which<S, FORWARD_KL>(a, stream, which);
    case REVERSE_KL: return launch_which<S, REVERSE_KL>(a, stream, which);
    case JSD: return launch_which<S, JSD>(a, stream, which);
    case SKEW_KL: return launch_which<S, SKEW_KL>(a, stream, which);
    case SKEW_REVERSE_KL: return launch_which<S, SKEW_REVERSE_KL>(a, stream, which);
    case TVD: return launch_which<S, TVD>(a, stream, which);
    case LOGIT_MSE: return which == FUSED || which == GIVEN_STATS
                               ? (int)cudaErrorInvalidValue
                               : launch_mse<S>(a, stream, which == FORWARD);
    default: return (int)cudaErrorInvalidValue;
  }
}

int dispatch(const RowsArgs& a, void* stream, int which) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // one CTA (or cluster) per row on grid.x; row_offset's 32-bit division
  if (a.N < 0 || a.N > 0x7fffffffLL ||
      (a.N > 0 && (a.L < 1 || a.t_L < 1 || a.L > a.N || a.t_L > a.N)))
    return (int)cudaErrorInvalidValue;
  switch (a.dtype) {
    case F32: return dispatch_div<float>(a, st, which);
    case BF16: return dispatch_div<__nv_bfloat16>(a, st, which);
    case F16: return dispatch_div<__half>(a, st, which);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

int cuda_forward_rows(const RowsArgs& args, void* stream) { return dispatch(args, stream, FORWARD); }
int cuda_given_stats_rows(const RowsArgs& args, void* stream) { return dispatch(args, stream, GIVEN_STATS); }
int cuda_backward_rows(const RowsArgs& args, void* stream) { return dispatch(args, stream, BACKWARD); }
int cuda_forward_grad_rows(const RowsArgs& args, void* stream) { return dispatch(args, stream, FUSED); }
int cuda_rescale_rows(void* grad, int dtype, const float* grad_loss, const float* grad_scale, int64_t N,
                      int64_t V, int64_t L, int64_t stride_b, int64_t stride_l, void* stream) {
  if (N == 0 || V == 0) return 0;
  void (*kernel)(void*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t);
  switch (dtype) {
    case F32: kernel = rescale_kernel<float>; break;
    case BF16: kernel = rescale_kernel<__nv_bfloat16>; break;
    case F16: kernel = rescale_kernel<__half>; break;
    default: return (int)cudaErrorInvalidValue;
  }
  dim3 grid((unsigned)N), block(THREADS);
  if (cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // as in launch()
  KD_LAUNCH(kernel, grid, block, 0, static_cast<cudaStream_t>(stream), grad, grad_loss, grad_scale, N, V, L,
            stride_b, stride_l);
  return (int)cudaGetLastError();
}
const char* cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // namespace kd

#include "ensemble_cuda.cuh"  // teacher ensembles: kernels sharing the helpers above
