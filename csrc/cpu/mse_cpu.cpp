// CPU kernels of logit_mse (divergence id LOGIT_MSE; math and stats layout in kd_mse.h).
//
// As the other CPU row kernels (kd_cpu.cpp): one row at a time, V-blocks of up to BLK elements
// converted to fp32 into stack buffers that stay in L1, the per-element math in `omp simd` loops
// the compiler vectorizes, sums in double. Threading is the caller's (bindings.cpp).
//   forward:  pass 1 sums d = t - s over the kept columns and counts them (and takes the hard
//             term's (max, sum-exp) of s); pass 2 sums c^2, c = d - mu.
//   backward: one pass, -soft_weight * c / n + hard_weight * (softmax(s) - onehot).
//   fused:    pass 1 as forward, keeping d (and s for the hard term) in per-thread fp32 scratch
//             rows; then one pass over the scratch forms the loss and writes the gradient.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>

#include "kd_dtype.h"
#include "kd_math.h"
#include "kd_mse.h"
#include "kd_rows.h"

namespace kd {
namespace {

constexpr int BLK = 1024;

struct MseCtx {
  bool soft, hard, ignored, bad_label;
  int64_t label;
};

inline MseCtx mse_context(const RowsArgs& a, int64_t r) {
  MseCtx c;
  c.soft = a.soft_weight != 0.f;
  c.label = a.labels ? a.labels[r] : 0;
  c.ignored = a.labels && c.label == a.ignore_index;
  c.hard = a.labels && a.hard_weight != 0.f;
  c.bad_label = c.hard && (c.label < 0 || c.label >= a.V);
  return c;
}

// The hard term's online (max, sum-exp) of s at T = 1, block by block.
struct HardNorm {
  float m = kNegInf, z = 0.f;
  void add_block(const float* x, int n) {
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int i = 0; i < n; ++i) bm = x[i] > bm ? x[i] : bm;
    const float mn = bm > m ? bm : m;
    z *= rescale(m, mn);
    m = mn;
    const float off = safe_max(m);
    float bz = 0.f;
#pragma omp simd reduction(+ : bz)
    for (int i = 0; i < n; ++i) bz += exp_fast(x[i] - off);
    z += bz;
  }
  LogNorm norm() const { return lognorm_from(m, z); }
};

// Pass 1 over one block of t (tb) and s (sb): sum of d and number of kept columns.
inline void block_diff_sums(const float* __restrict tb, const float* __restrict sb, int n,
                            double& sum_d, int64_t& kept) {
  double bs = 0.;
  int bk = 0;
#pragma omp simd reduction(+ : bs, bk)
  for (int i = 0; i < n; ++i) {
    bs += mse_diff(tb[i], sb[i]);
    bk += mse_kept(tb[i], sb[i]) ? 1 : 0;
  }
  sum_d += bs;
  kept += bk;
}

// Pass 1 of one row: mu, n and the hard term's normaliser (when `hard`).
template <class S>
void row_stats(const S* s, const S* t, int64_t V, bool soft, bool hard, float& mu, float& n,
               LogNorm& ns) {
  alignas(64) float tb[BLK], sb[BLK];
  double sum_d = 0.;
  int64_t kept = 0;
  HardNorm hn;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int m = (int)std::min<int64_t>(BLK, V - j0);
    load_block(s + j0, sb, m);
    if (soft) {
      load_block(t + j0, tb, m);
      block_diff_sums(tb, sb, m, sum_d, kept);
    }
    if (hard) hn.add_block(sb, m);
  }
  n = (float)kept;
  mu = soft ? mse_mean(sum_d, n) : 0.f;
  ns = hard ? hn.norm() : LogNorm{0.f, 0.f};
}

template <class S>
void mse_forward_row(const RowsArgs& a, int64_t r) {
  const MseCtx c = mse_context(a, r);
  float* st = a.stats + r * STATS_WIDTH;
  if (c.ignored) {
    a.loss[r] = 0.f;
    for (int k = 0; k < STATS_WIDTH; ++k) st[k] = 0.f;
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  const int64_t V = a.V;
  float mu, n;
  LogNorm ns;
  row_stats(s, t, V, c.soft, c.hard, mu, n, ns);
  float loss = 0.f;
  if (c.soft) {
    // Pass 2: sum of c^2 (skipped when mu is not finite: the loss is NaN then).
    double sum_c2 = 0.;
    if (mse_grad_defined(mu)) {
      alignas(64) float tb[BLK], sb[BLK];
      for (int64_t j0 = 0; j0 < V; j0 += BLK) {
        const int m = (int)std::min<int64_t>(BLK, V - j0);
        load_block(t + j0, tb, m);
        load_block(s + j0, sb, m);
        double bs = 0.;
#pragma omp simd reduction(+ : bs)
        for (int i = 0; i < m; ++i) {
          const float cc = mse_centred(tb[i], sb[i], mu);
          bs += cc * cc;
        }
        sum_c2 += bs;
      }
    }
    loss = a.soft_weight * mse_loss(sum_c2, n, mu);
  }
  if (c.hard) loss += a.hard_weight * (c.bad_label ? NAN : hard_ce(ns, load_one(s + c.label)));
  a.loss[r] = loss;
  store_mse_stats(st, mu, n, ns);
}

template <class S>
void fill(S* g, int64_t V, float v) {
  alignas(64) float b[BLK];
  for (int i = 0; i < BLK; ++i) b[i] = v;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) store(b, g + j0, (int)std::min<int64_t>(BLK, V - j0));
}

// Gradient of one block (t in tb, s in sb; tb unused when k_soft = 0, ns unused when k_hard = 0).
inline void grad_block(const float* __restrict tb, const float* __restrict sb, float* __restrict gb,
                       int n, bool soft, bool hard, float mu, float k_soft, float k_hard, LogNorm ns) {
  if (soft && hard) {
#pragma omp simd
    for (int i = 0; i < n; ++i)
      gb[i] = mse_grad_element(tb[i], sb[i], mu, k_soft, k_hard, exp_fast(log_prob(sb[i], ns)), 0.f);
  } else if (soft) {
#pragma omp simd
    for (int i = 0; i < n; ++i) gb[i] = -k_soft * mse_centred(tb[i], sb[i], mu);
  } else if (hard) {
#pragma omp simd
    for (int i = 0; i < n; ++i) gb[i] = k_hard * exp_fast(log_prob(sb[i], ns));
  } else {
    std::memset(gb, 0, sizeof(float) * n);
  }
}

template <class S>
void mse_backward_row(const RowsArgs& a, int64_t r) {
  const MseCtx c = mse_context(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const int64_t V = a.V;
  if (c.ignored) {
    fill(g, V, 0.f);
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  const float* st = a.stats + r * STATS_WIDTH;
  const float mu = st[MSE_MU], n = st[MSE_N];  // columns 0 and 1 only (kd_mse.h)
  const LogNorm ns{st[STAT_MS], st[STAT_LZS]};
  if (c.soft && !mse_grad_defined(mu)) {
    fill(g, V, NAN);  // -inf in one model only (or NaN): NaN row (docs/precision.md)
    return;
  }
  const float gl = a.grad_loss[r];
  const float k_soft = c.soft ? gl * a.soft_weight / mse_divisor(n) : 0.f;
  // A label outside [0, V) that is not ignore_index adds the softmax term and no one-hot.
  const float k_hard = c.hard ? gl * a.hard_weight : 0.f;
  alignas(64) float tb[BLK], sb[BLK], gb[BLK];
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int m = (int)std::min<int64_t>(BLK, V - j0);
    load_block(s + j0, sb, m);
    if (c.soft) load_block(t + j0, tb, m);
    grad_block(tb, sb, gb, m, c.soft, c.hard, mu, k_soft, k_hard, ns);
    if (c.hard && c.label >= j0 && c.label < j0 + m) gb[c.label - j0] -= k_hard;
    store(gb, g + j0, m);
  }
}

// Fused forward + gradient for grad_loss = a.grad_loss (the caller's expected one). The row is
// read from memory once: pass 1 keeps d = t - s (NaN where both are -inf) in the scratch row x
// and, for the hard term, s in y. With mu finite every kept column has a finite d, so the
// scratch's NaNs are exactly the columns left out (mse_centred of the two-kernel path); a mu that
// is not finite makes the loss and the gradient row NaN. Rows the fused path does not cover
// (ignored rows, no soft term, a label out of range) take forward + backward, same values.
template <class S>
void mse_fused_row(const RowsArgs& a, int64_t r, float* __restrict x, float* __restrict y) {
  const MseCtx c = mse_context(a, r);
  if (c.ignored || !c.soft || c.bad_label) {
    mse_forward_row<S>(a, r);
    mse_backward_row<S>(a, r);
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const int64_t V = a.V;
  alignas(64) float tb[BLK], gb[BLK];
  double sum_d = 0.;
  int64_t kept = 0;
  HardNorm hn;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int m = (int)std::min<int64_t>(BLK, V - j0);
    float* __restrict sb = y + j0;  // s stays in y (read again only for the hard term)
    load_block(t + j0, tb, m);
    load_block(s + j0, sb, m);
    block_diff_sums(tb, sb, m, sum_d, kept);
    if (c.hard) hn.add_block(sb, m);
    float* __restrict xb = x + j0;
#pragma omp simd
    for (int i = 0; i < m; ++i) xb[i] = tb[i] - sb[i];
  }
  const float n = (float)kept;
  const float mu = mse_mean(sum_d, n);
  const LogNorm ns = c.hard ? hn.norm() : LogNorm{0.f, 0.f};
  const float ce = c.hard ? hard_ce(ns, load_one(s + c.label)) : 0.f;
  if (!mse_grad_defined(mu)) {
    a.loss[r] = NAN;
    fill(g, V, NAN);
    return;
  }
  const float gl = a.grad_loss[r];
  const float k_soft = gl * a.soft_weight / mse_divisor(n);
  const float k_hard = c.hard ? gl * a.hard_weight : 0.f;
  double sum_c2 = 0.;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int m = (int)std::min<int64_t>(BLK, V - j0);
    const float* __restrict xb = x + j0;
    const float* __restrict sb = y + j0;
    double bs = 0.;
    if (c.hard) {
#pragma omp simd reduction(+ : bs)
      for (int i = 0; i < m; ++i) {
        const float cc = xb[i] == xb[i] ? xb[i] - mu : 0.f;
        bs += cc * cc;
        gb[i] = -k_soft * cc + k_hard * exp_fast(log_prob(sb[i], ns));
      }
    } else {
#pragma omp simd reduction(+ : bs)
      for (int i = 0; i < m; ++i) {
        const float cc = xb[i] == xb[i] ? xb[i] - mu : 0.f;
        bs += cc * cc;
        gb[i] = -k_soft * cc;
      }
    }
    sum_c2 += bs;
    if (c.hard && c.label >= j0 && c.label < j0 + m) gb[c.label - j0] -= k_hard;
    store(gb, g + j0, m);
  }
  float loss = a.soft_weight * mse_loss(sum_c2, n, mu);
  if (c.hard) loss += a.hard_weight * ce;
  a.loss[r] = loss;
}

template <class S>
void run_rows(const RowsArgs& a, int64_t r0, int64_t r1, bool fwd) {
  for (int64_t r = r0; r < r1; ++r) fwd ? mse_forward_row<S>(a, r) : mse_backward_row<S>(a, r);
}

template <class S>
void run_fused(const RowsArgs& a, std::atomic<int64_t>& next, int64_t chunk) {
  const int64_t row = ((a.V + 15) / 16) * 16;
  std::unique_ptr<float[]> scratch(new float[2 * row + 16]);
  float* x = scratch.get();
  x += (16 - (reinterpret_cast<uintptr_t>(x) / sizeof(float)) % 16) % 16;  // 64-byte aligned
  float* y = x + row;
  for (;;) {
    const int64_t r0 = next.fetch_add(chunk);
    if (r0 >= a.N) break;
    const int64_t r1 = std::min(a.N, r0 + chunk);
    for (int64_t r = r0; r < r1; ++r) mse_fused_row<S>(a, r, x, y);
  }
}

}  // namespace

void cpu_mse_forward_rows(const RowsArgs& a, int64_t row_begin, int64_t row_end) {
  with_dtype(a.dtype, [&](auto tag) { run_rows<decltype(tag)>(a, row_begin, row_end, true); });
}

void cpu_mse_backward_rows(const RowsArgs& a, int64_t row_begin, int64_t row_end) {
  with_dtype(a.dtype, [&](auto tag) { run_rows<decltype(tag)>(a, row_begin, row_end, false); });
}

void cpu_mse_forward_grad_rows(const RowsArgs& a, std::atomic<int64_t>& next, int64_t chunk) {
  with_dtype(a.dtype, [&](auto tag) { run_fused<decltype(tag)>(a, next, chunk); });
}

}  // namespace kd
