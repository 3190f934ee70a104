// C++ CPU kernels of the sparse (stored top-k teacher) loss and their kdkernels_C op registrations.
//
//   sparse_stats(s, idx, labels?, temperature, need_b, need_a) -> (stats [N, 3], gathered [N, K])
//   sparse_grad(s, stats, idx, labels?, temperature, need_b, need_a, c_b, c_a, g_idx, g_lab)
//       -> grad [B, L, V] (student dtype, contiguous)
//
// The same contract as kdkernels/backends/triton/sparse_launch.py (see csrc/include/kd_sparse.h). Rows are
// spread over threads with at::parallel_for; each row is walked in blocks of BLK columns that are
// converted to fp32 into a stack buffer (L1) and processed by `omp simd` loops over the branch-free
// exp_fast of kd_math.h. No [N, V] temporary: the only large write is the gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "kd_dtype.h"
#include "kd_math.h"
#include "kd_mem.h"
#include "kd_sparse.h"

namespace kd {
namespace sparse_cpu {
namespace {

constexpr int BLK = 2048;

// Block conversion to and from fp32: kd_dtype.h (load_block, store, load_one, to_dtype).

// xb = x * inv_t, each product rounded to fp32 in its own loop (see sparse_dense_grad: no FMA
// contraction into a later subtraction, so every pass sees the same b = s/T as the Python head).
inline void scale_block(const float* x, float* xb, int n, float inv_t) {
#pragma omp simd
  for (int i = 0; i < n; ++i) xb[i] = x[i] * inv_t;
}

// ---- online log-sum-exp over blocks ----------------------------------------------------------
struct Lse {
  float m = kNegInf, z = 0.f;
  void add(const float* x, int n) {
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int i = 0; i < n; ++i) bm = x[i] > bm ? x[i] : bm;
    const float off = safe_max(bm);
    float bz = 0.f;
#pragma omp simd reduction(+ : bz)
    for (int i = 0; i < n; ++i) bz += exp_fast(x[i] - off);
    merge_max_sum(m, z, bm, bz);
  }
  float value() const { return logsumexp_from(m, z); }
};

// ---- forward: statistics and gathers of rows [r0, r1) ------------------------------------------
template <typename scalar_t>
void stats_rows(const SparseArgs& a, int64_t r0, int64_t r1) {
  alignas(64) float buf[BLK];
  alignas(64) float bbuf[BLK];
  const scalar_t* s = static_cast<const scalar_t*>(a.s);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = s + sparse_row_offset(a, r);
    const int64_t* idx = a.idx + r * a.K;
    float* gath = a.gathered + r * a.K;
    for (int64_t k = 0; k < a.K; ++k) gath[k] = idx[k] >= 0 ? load_one(row + idx[k]) : 0.f;

    float lse_b = 0.f, lse_a = 0.f, s_lab = 0.f;
    if (a.need_b || a.need_a) {
      Lse b, c;
      for (int64_t v0 = 0; v0 < a.V; v0 += BLK) {
        const int n = (int)std::min<int64_t>(BLK, a.V - v0);
        load_block(row + v0, buf, n);
        if (a.need_b) {
          scale_block(buf, bbuf, n, a.inv_t);
          b.add(bbuf, n);
        }
        if (a.need_a) c.add(buf, n);
      }
      if (a.need_b) lse_b = b.value();
      if (a.need_a) {
        lse_a = c.value();
        const int64_t lab = a.labels[r];
        if (lab >= 0 && lab < a.V) s_lab = load_one(row + lab);
      }
    }
    float* st = a.stats + r * SP_STATS_WIDTH;
    st[SP_LSE_B] = lse_b;
    st[SP_LSE_A] = lse_a;
    st[SP_S_LAB] = s_lab;
  }
}

// ---- backward: gradient of rows [r0, r1) -----------------------------------------------------
// x[0..n) -> the dense gradient terms, in place; xb is scratch space for x * inv_t.
template <bool UB, bool UA>
inline void dense_block(float* x, float* xb, int n, float c_b, float lse_b, float c_a, float lse_a,
                        float inv_t) {
  if (UB) scale_block(x, xb, n, inv_t);
#pragma omp simd
  for (int i = 0; i < n; ++i)
    x[i] = sparse_dense_grad(x[i], UB ? xb[i] : 0.f, UB, c_b, lse_b, UA, c_a, lse_a);
}

inline void dense_block(bool ub, bool ua, float* x, float* xb, int n, float c_b, float lse_b,
                        float c_a, float lse_a, float inv_t) {
  if (ub && ua) dense_block<true, true>(x, xb, n, c_b, lse_b, c_a, lse_a, inv_t);
  else if (ub) dense_block<true, false>(x, xb, n, c_b, lse_b, c_a, lse_a, inv_t);
  else if (ua) dense_block<false, true>(x, xb, n, c_b, lse_b, c_a, lse_a, inv_t);
  else std::memset(static_cast<void*>(x), 0, sizeof(float) * n);
}

template <typename scalar_t>
void grad_rows(const SparseArgs& a, int64_t r0, int64_t r1) {
  alignas(64) float buf[BLK];
  alignas(64) float bbuf[BLK];
  constexpr int KB = 256;  // gathered columns per fix-up chunk
  float kval[KB];
  int64_t kcol[KB];
  const scalar_t* s = static_cast<const scalar_t*>(a.s);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = s + sparse_row_offset(a, r);
    scalar_t* out = grad + r * a.V;
    const float* st = a.stats + r * SP_STATS_WIDTH;
    const float c_b = a.c_b[r], c_a = a.c_a[r];
    const float lse_b = st[SP_LSE_B], lse_a = st[SP_LSE_A];
    const bool ub = a.need_b && c_b != 0.f, ua = a.need_a && c_a != 0.f;

    // 1. every column: the softmax terms
    if (!ub && !ua) {
      std::memset(static_cast<void*>(out), 0, sizeof(scalar_t) * a.V);
    } else {
      for (int64_t v0 = 0; v0 < a.V; v0 += BLK) {
        const int n = (int)std::min<int64_t>(BLK, a.V - v0);
        load_block(row + v0, buf, n);
        dense_block(ub, ua, buf, bbuf, n, c_b, lse_b, c_a, lse_a, a.inv_t);
        store(buf, out + v0, n);
      }
    }

    // 2. the K gathered columns and the label column: the dense value recomputed in fp32 by the
    //    same block code (bit-identical), plus the sparse gradient, rounded once
    const int64_t lab = a.need_a ? a.labels[r] : -1;
    const bool lab_ok = lab >= 0 && lab < a.V;
    const float g_lab = a.need_a ? a.g_lab[r] : 0.f;
    bool hit = false;
    const int64_t* idx = a.idx + r * a.K;
    const float* g_idx = a.g_idx + r * a.K;
    for (int64_t k0 = 0; k0 < a.K + 1; k0 += KB) {
      int n = 0;
      for (int64_t k = k0; k < std::min<int64_t>(a.K + 1, k0 + KB); ++k) {
        // slot k < K: a gathered column; slot K: the label column unless a slot named it
        const int64_t j = k < a.K ? idx[k] : ((lab_ok && !hit) ? lab : -1);
        if (j < 0) continue;
        float extra = k < a.K ? g_idx[k] : g_lab;
        if (k < a.K && a.need_a && j == lab) {
          extra += g_lab;
          hit = true;
        }
        kcol[n] = j;
        buf[n] = load_one(row + j);
        kval[n] = extra;
        ++n;
      }
      dense_block(ub, ua, buf, bbuf, n, c_b, lse_b, c_a, lse_a, a.inv_t);
      for (int i = 0; i < n; ++i) out[kcol[i]] = to_dtype<scalar_t>(buf[i] + kval[i]);
    }
  }
}

// ---- torch bindings --------------------------------------------------------------------------
// A fresh gradient buffer (kd_mem.h, as for the dense CPU kernels): huge pages advised, pages
// faulted in by all threads; the kernel then writes every element.
void prepare_grad(const at::Tensor& grad) {
  ::kd::prepare_gradient(grad.data_ptr(), grad.numel() * grad.element_size(), [](int64_t n, const auto& f) {
    at::parallel_for(0, n, 1, f);
  });
}

SparseArgs make_args(const at::Tensor& s, const at::Tensor& idx, const c10::optional<at::Tensor>& labels,
                     double temperature, bool need_b, bool need_a) {
  TORCH_CHECK_VALUE(s.dim() == 3, "kdkernels_C.sparse: student must be a [B, L, V] view, got shape ",
                    s.sizes());
  TORCH_CHECK_VALUE(s.device().is_cpu(), "kdkernels_C.sparse: student must be a CPU tensor, got ",
                    s.device());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16 ||
                       s.scalar_type() == at::kHalf,
                   "kdkernels_C.sparse: student dtype must be float32, bfloat16 or float16, got ",
                   s.scalar_type());
  const int64_t B = s.size(0), L = s.size(1), V = s.size(2), N = B * L;
  TORCH_CHECK_VALUE(V >= 1, "kdkernels_C.sparse: V must be >= 1");
  TORCH_CHECK_VALUE(s.stride(2) == 1 || V == 1, "kdkernels_C.sparse: student must have unit column stride");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "kdkernels_C.sparse: idx must be int64, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == N && idx.size(1) >= 1 && idx.is_contiguous() &&
                        idx.device() == s.device(),
                    "kdkernels_C.sparse: idx must be a contiguous [N, K] CPU tensor with N = ", N,
                    ", got shape ", idx.sizes());
  TORCH_CHECK_VALUE(temperature > 0, "kdkernels_C.sparse: temperature must be > 0, got ", temperature);
  SparseArgs a;
  a.s = s.data_ptr();
  a.N = N;
  a.L = L;
  a.V = V;
  a.K = idx.size(1);
  a.stride_b = s.stride(0);
  a.stride_l = s.stride(1);
  a.idx = idx.data_ptr<int64_t>();
  a.inv_t = (float)(1.0 / temperature);
  a.need_b = need_b;
  a.need_a = need_a;
  if (need_a) {
    TORCH_CHECK_VALUE(labels.has_value(), "kdkernels_C.sparse: need_a requires labels");
    const at::Tensor& lab = *labels;
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, "kdkernels_C.sparse: labels must be int64, got ",
                     lab.scalar_type());
    TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == N && lab.is_contiguous() && lab.device() == s.device(),
                      "kdkernels_C.sparse: labels must be a contiguous [N] CPU tensor with N = ", N,
                      ", got shape ", lab.sizes());
    a.labels = lab.data_ptr<int64_t>();
  }
  return a;
}

at::Tensor f32_vec(const at::Tensor& x, int64_t N, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == N, "kdkernels_C.sparse: ", name, " must have shape [",
                    N, "], got ", x.sizes());
  return x.to(at::kFloat).contiguous();
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  with_dtype(t == at::kFloat ? F32 : t == at::kBFloat16 ? BF16 : F16, f);
}

std::tuple<at::Tensor, at::Tensor> sparse_stats_cpu(const at::Tensor& s, const at::Tensor& idx,
                                                    const c10::optional<at::Tensor>& labels,
                                                    double temperature, bool need_b, bool need_a) {
  SparseArgs a = make_args(s, idx, labels, temperature, need_b, need_a);
  auto f32 = s.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({a.N, SP_STATS_WIDTH}, f32);
  at::Tensor gathered = at::empty({a.N, a.K}, f32);
  a.stats = stats.data_ptr<float>();
  a.gathered = gathered.data_ptr<float>();
  const int64_t grain = (need_a || need_b) ? grain_rows(a.V) : std::max<int64_t>(1, 4096 / a.K);
  dispatch(s.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, a.N, grain, [&](int64_t r0, int64_t r1) { stats_rows<scalar_t>(a, r0, r1); });
  });
  return {stats, gathered};
}

at::Tensor sparse_grad_cpu(const at::Tensor& s, const at::Tensor& stats, const at::Tensor& idx,
                           const c10::optional<at::Tensor>& labels, double temperature, bool need_b,
                           bool need_a, const at::Tensor& c_b, const at::Tensor& c_a,
                           const at::Tensor& g_idx, const at::Tensor& g_lab) {
  SparseArgs a = make_args(s, idx, labels, temperature, need_b, need_a);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == a.N && stats.size(1) == SP_STATS_WIDTH,
                    "kdkernels_C.sparse: stats must have shape [", a.N, ", ", int(SP_STATS_WIDTH),
                    "], got ", stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "kdkernels_C.sparse: stats must be float32");
  TORCH_CHECK_VALUE(g_idx.dim() == 2 && g_idx.size(0) == a.N && g_idx.size(1) == a.K,
                    "kdkernels_C.sparse: g_idx must have shape [", a.N, ", ", a.K, "], got ", g_idx.sizes());
  at::Tensor st = stats.contiguous();
  at::Tensor cb = f32_vec(c_b, a.N, "c_b"), ca = f32_vec(c_a, a.N, "c_a"),
             gl = f32_vec(g_lab, a.N, "g_lab");
  at::Tensor gi = g_idx.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous));
  a.stats = st.data_ptr<float>();
  a.c_b = cb.data_ptr<float>();
  a.c_a = ca.data_ptr<float>();
  a.g_idx = gi.data_ptr<float>();
  a.g_lab = gl.data_ptr<float>();
  a.grad = grad.data_ptr();
  prepare_grad(grad);
  dispatch(s.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, a.N, grain_rows(a.V), [&](int64_t r0, int64_t r1) { grad_rows<scalar_t>(a, r0, r1); });
  });
  return grad;
}

}  // namespace
}  // namespace sparse_cpu
}  // namespace kd

TORCH_LIBRARY_FRAGMENT(kdkernels_C, m) {
  m.def("sparse_stats(Tensor s, Tensor idx, Tensor? labels, float temperature, bool need_b, "
        "bool need_a) -> (Tensor, Tensor)");
  m.def("sparse_grad(Tensor s, Tensor stats, Tensor idx, Tensor? labels, float temperature, "
        "bool need_b, bool need_a, Tensor c_b, Tensor c_a, Tensor g_idx, Tensor g_lab) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels_C, CPU, m) {
  m.impl("sparse_stats", &kd::sparse_cpu::sparse_stats_cpu);
  m.impl("sparse_grad", &kd::sparse_cpu::sparse_grad_cpu);
}
