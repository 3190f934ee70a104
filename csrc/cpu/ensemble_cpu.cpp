// CPU row kernels of teacher ensembles: the target is p = sum_m w_m softmax(t_m / T) (DESIGN.md §3,
// "Multi-teacher targets"); the argument block and the stats layout are in kd_ensemble.h.
//
// One row at a time, in V-blocks converted to fp32 into buffers that stay in L1 (kd_cpu_blocks.h),
// with the per-element math of kd_math.h in `omp simd` loops, as kd_cpu.cpp does:
//   pass 1: online (max, sum-exp) of a_m = t_m/T for each teacher of nonzero weight, of b = s/T,
//           maxima in raw logit units (exponents (x - max)/T, the shift first), and of s for the
//           hard term at T != 1 (one code path for teachers and student, so a
//           teacher equal to the student gets bitwise the student's normaliser);
//   pass 2: per block, log p = hi + (log sum_m w_m e^{lp_m - hi} - log sum_m w_m) with
//           lp_m = (t_m - max_m)/T - log z_m and hi = max_m lp_m per element (no underflow where
//           every teacher's probability is tiny; -inf where every teacher has -inf; identical
//           teachers give exactly lp_0, the sum over m equalling the sum of the weights bitwise),
//           then the loss terms and c = sum q g from div_terms, as the single-teacher pass 2.
//           Forward and reverse KL have no online form with an ensemble: they take pass 2 too.
//   backward: log p recomputed per block from the stats, the gradient q (g - c) written once.
//   fused (loss and gradient for a grad_loss known in advance): pass 1, then pass 2 also keeps
//           q g and q of the row in two per-thread scratch rows, and the gradient is written
//           from them (fused_row).
// No [N, V] temporary and no teacher probability row: per thread, M + 1 fp32 blocks (and the
// fused kernel's two scratch rows of V floats).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "kd_cpu_blocks.h"
#include "kd_dtype.h"
#include "kd_ensemble.h"
#include "kd_math.h"
#include "kd_switch.h"

namespace kd {
namespace {

using namespace cpu_blocks;

// Per-thread working set: the teachers of nonzero weight ("active", in their given order), their
// row pointers and normalisers for the current row, and the blocks of pass 2.
struct Work {
  int64_t K = 0;
  std::vector<int64_t> idx;     // original index of active teacher k
  std::vector<float> w;         // its weight
  float lW = 0.f;               // log of sum_k w_k, summed in the order logp_block sums
  std::vector<const void*> tp;  // active teacher k's current row
  std::vector<LogNorm> na;      // and its normaliser
  std::vector<Online> ot;       // pass 1 state
  std::unique_ptr<float[]> mem;
  float* lpk = nullptr;  // [K][BLK] per-teacher log-probabilities of a block
  float* hi = nullptr;   // [BLK] their per-element maximum
  float* x = nullptr;    // fused kernel only: [V] q g of the row
  float* y = nullptr;    // fused kernel only: [V] q of the row

  Work(const EnsembleArgs& e, bool fused) {
    for (int64_t m = 0; m < e.M; ++m) {
      if (e.weights[m] > 0.f) {
        idx.push_back(m);
        w.push_back(e.weights[m]);
      }
    }
    K = (int64_t)idx.size();
    float W = 0.f;
    for (int64_t k = 0; k < K; ++k) W += w[k];
    lW = log_fast(W);
    tp.resize(K);
    na.resize(K);
    ot.resize(K);
    const int64_t row = fused ? ((e.rows.V + 15) / 16) * 16 : 0;
    mem.reset(new float[(K + 1) * BLK + 2 * row + 16]);
    float* p = mem.get();
    p += (16 - (reinterpret_cast<uintptr_t>(p) / sizeof(float)) % 16) % 16;  // 64-byte aligned
    lpk = p;
    hi = p + K * BLK;
    if (fused) {
      x = hi + BLK;
      y = x + row;
    }
  }

  template <class S>
  void set_row(const EnsembleArgs& e, int64_t r) {
    for (int64_t k = 0; k < K; ++k)
      tp[k] = static_cast<const S*>(e.teachers[idx[k]]) + ensemble_teacher_offset(e, idx[k], r);
  }
  template <class S>
  const S* teacher(int64_t k) const { return static_cast<const S*>(tp[k]); }
};

// Pass 1 for one distribution and block: the block converted and absorbed into the online
// (max, sum-exp) state of x / T, the maximum kept in raw logit units (the shift before the 1/T
// scaling, as kd_cpu.cpp). The same code for every teacher and the student.
template <class S>
inline void absorb_block(const S* x, float* __restrict buf, int n, float invT, Online& o) {
  load_block(x, buf, n);
  o.raise(block_max(buf, n), invT);
  o.z += sum_exp(buf, n, safe_max(o.m), invT);
}

// log p of the block [j0, j0 + n) into lp (see the file comment). NaN in a teacher's logits (or
// normaliser) gives NaN; a column that is -inf in every active teacher gives -inf.
template <class S>
void logp_block(Work& wk, int64_t j0, int n, float invT, float* __restrict lp) {
  float* __restrict hi = wk.hi;
  for (int i = 0; i < n; ++i) hi[i] = kNegInf;
  for (int64_t k = 0; k < wk.K; ++k) {
    float* __restrict L = wk.lpk + k * BLK;
    load_block(wk.teacher<S>(k) + j0, L, n);  // raw: the maxima of wk.na are raw
    const LogNorm nk = wk.na[k];
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const float x = log_prob_scaled(L[i], nk, invT);
      L[i] = x;
      hi[i] = raise_max(hi[i], x);
    }
  }
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    hi[i] = safe_max(hi[i]);
    lp[i] = 0.f;
  }
  for (int64_t k = 0; k < wk.K; ++k) {
    const float* __restrict L = wk.lpk + k * BLK;
    const float wt = wk.w[k];
#pragma omp simd
    for (int i = 0; i < n; ++i) lp[i] += wt * exp_nonpos(L[i] - hi[i]);  // e^0 = 1 exactly
  }
  const float lW = wk.lW;
#pragma omp simd
  for (int i = 0; i < n; ++i) lp[i] = hi[i] + (log_fast(lp[i]) - lW);
}

// Pass 1 over the row: the teachers' normalisers into wk.na (when the soft term counts), the
// student's at T (nb) and at T = 1 (ns, for a hard term at T != 1); true when a normaliser is NaN.
template <class S>
bool stats_pass(const RowCtx& c, Work& wk, const S* s, int64_t V, float invT, LogNorm& nb,
                LogNorm& ns) {
  alignas(64) float buf[BLK];
  const int64_t K = wk.K;
  for (int64_t k = 0; k < K; ++k) wk.ot[k] = Online();
  Online ob, os;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    if (c.soft) {
      for (int64_t k = 0; k < K; ++k) absorb_block(wk.teacher<S>(k) + j0, buf, n, invT, wk.ot[k]);
      absorb_block(s + j0, buf, n, invT, ob);
    }
    if (c.hard_separate) absorb_block(s + j0, buf, n, 1.0f, os);
  }
  bool nan_norm = false;
  for (int64_t k = 0; k < K; ++k) {
    wk.na[k] = c.soft ? lognorm_from(wk.ot[k].m, wk.ot[k].z) : LogNorm{0.f, 0.f};
    nan_norm = nan_norm || lognorm_nan(wk.na[k]);
  }
  nb = c.soft ? lognorm_from(ob.m, ob.z) : LogNorm{0.f, 0.f};
  nan_norm = nan_norm || lognorm_nan(nb);
  ns = c.hard_separate ? lognorm_from(os.m, os.z) : nb;
  return nan_norm;
}

template <class S, int DIV>
void forward_row(const EnsembleArgs& e, Work& wk, int64_t r) {
  const RowsArgs& a = e.rows;
  const RowCtx c = row_context(a, r);
  float* st = a.stats + r * e.stats_width;
  if (c.ignored) {
    a.loss[r] = 0.f;
    for (int64_t k = 0; k < e.stats_width; ++k) st[k] = 0.f;
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  wk.set_row<S>(e, r);
  const int64_t V = a.V, K = wk.K;
  const float invT = 1.0f / a.temperature;
  alignas(64) float bb[BLK], lpb[BLK];

  LogNorm nb, ns;
  const bool nan_norm = stats_pass<S>(c, wk, s, V, invT, nb, ns);  // pass 1: the normalisers
  float cc = 0.f, D = 0.f;
  if (c.soft) {
    // Pass 2: the divergence and c = sum q g (in double, as kd_cpu.cpp row_sums).
    double sphi = 0., sqg = 0.;
    const float param = a.param;
    for (int64_t j0 = 0; j0 < V; j0 += BLK) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      logp_block<S>(wk, j0, n, invT, lpb);
      load_block(s + j0, bb, n);
      double bphi = 0., bqg = 0.;
#pragma omp simd reduction(+ : bphi, bqg)
      for (int i = 0; i < n; ++i) {
        const float lp = lpb[i], lq = log_prob_scaled(bb[i], nb, invT);
        float phi, qg;
        div_terms<DIV>(lp, lq, exp_fast(lp), exp_fast(lq), param, phi, qg);
        bphi += phi;
        bqg += qg;
      }
      sphi += bphi;
      sqg += bqg;
    }
    D = nan_norm ? NAN : (float)sphi;  // NaN input: terms with q = NaN read as 0
    cc = DIV == FORWARD_KL ? -1.f : (float)sqg;  // forward KL: c = -sum p = -1
  }
  const float ce = !c.hard ? 0.f : c.bad_label ? NAN : hard_ce(ns, load_one(s + c.label));
  a.loss[r] = row_loss(c.soft, a.soft_weight, a.temperature, D, c.hard, a.hard_weight, ce);
  for (int64_t k = 0; k < e.stats_width; ++k) st[k] = 0.f;  // columns of zero-weight teachers
  const LogNorm na0 = K > 0 && wk.idx[0] == 0 ? wk.na[0] : LogNorm{0.f, 0.f};
  store_row_stats(st, RowStats{na0, nb, cc, ns});
  for (int64_t k = 0; k < K; ++k) {
    if (wk.idx[k] == 0) continue;
    const int64_t col = ensemble_stat_ma(wk.idx[k]);
    st[col] = wk.na[k].m;
    st[col + 1] = wk.na[k].lz;
  }
}

// Gradient of one block into gb from log p (lpb) and the student block(s): as kd_cpu.cpp
// grad_block, with log p given. MODE 0: soft only; 1: soft + hard at T = 1 (softmax(s) = q);
// 2: soft + hard with its own normaliser ns; 3: hard only.
template <int DIV, int MODE>
void grad_block(const float* __restrict lpb, const float* __restrict bb,
                const float* __restrict xb, float* __restrict gb, int n, LogNorm nb, float cc,
                LogNorm ns, float k_soft, float k_hard, float param, float invT) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    float out;
    if (MODE == 3) {
      out = k_hard * exp_fast(log_prob(xb[i], ns));
    } else {
      const float lp = lpb[i], lq = log_prob_scaled(bb[i], nb, invT);
      const float p = exp_fast(lp), q = exp_fast(lq);
      float phi, qg;
      div_terms<DIV>(lp, lq, p, q, param, phi, qg);
      if (MODE == 0) out = k_soft * (qg - q * cc);
      else if (MODE == 1) out = grad_element(k_soft, qg, q, cc, k_hard, q, 0.f);
      else out = grad_element(k_soft, qg, q, cc, k_hard, exp_fast(log_prob(xb[i], ns)), 0.f);
    }
    gb[i] = out;
  }
}

template <class S, int DIV>
void backward_row(const EnsembleArgs& e, Work& wk, int64_t r) {
  const RowsArgs& a = e.rows;
  const RowCtx c = row_context(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const int64_t V = a.V;
  if (c.ignored) {
    fill_row(g, V, 0.f);
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  wk.set_row<S>(e, r);
  const float* st = a.stats + r * e.stats_width;
  const RowStats rs = load_row_stats(st);
  for (int64_t k = 0; k < wk.K; ++k) {
    const int64_t col = ensemble_stat_ma(wk.idx[k]);
    wk.na[k] = LogNorm{st[col], st[col + 1]};
  }
  const LogNorm nb = rs.nb, ns = rs.ns;
  const float cc = rs.c, gl = a.grad_loss[r];
  const float k_soft = c.soft ? gl * a.soft_weight * a.temperature : 0.f;
  // a label outside [0, V) that is not ignore_index: the softmax term, no one-hot (NaN loss)
  const float k_hard = c.hard ? gl * a.hard_weight : 0.f;
  const float invT = 1.0f / a.temperature, param = a.param;
  const bool soft = c.soft, hard = c.hard, sep = c.hard_separate;
  if (soft && !grad_defined(cc)) {
    fill_row(g, V, NAN);  // an infinite term in the gradient: NaN row (docs/precision.md)
    return;
  }
  alignas(64) float lpb[BLK], bb[BLK], xb[BLK], gb[BLK];
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    if (soft) {
      logp_block<S>(wk, j0, n, invT, lpb);
      load_block(s + j0, bb, n);
    }
    if (sep) load_block(s + j0, xb, n);
    if (soft && !hard)
      grad_block<DIV, 0>(lpb, bb, xb, gb, n, nb, cc, ns, k_soft, k_hard, param, invT);
    else if (soft && !sep)
      grad_block<DIV, 1>(lpb, bb, xb, gb, n, nb, cc, ns, k_soft, k_hard, param, invT);
    else if (soft)
      grad_block<DIV, 2>(lpb, bb, xb, gb, n, nb, cc, ns, k_soft, k_hard, param, invT);
    else if (hard)
      grad_block<DIV, 3>(lpb, bb, xb, gb, n, nb, cc, ns, k_soft, k_hard, param, invT);
    else
      std::memset(gb, 0, sizeof(float) * n);
    if (hard && c.label >= j0 && c.label < j0 + n) gb[c.label - j0] -= k_hard;
    store(gb, g + j0, n);
  }
}

// Fused forward and gradient of one row, for the grad_loss given in advance (rows.grad_loss): the
// statistics pass, then ONE pass over the row forming log p, the loss terms, c and, per element,
// q g and q into the thread's scratch rows (wk.x, wk.y: 2 V floats, in L2 for V up to ~64k), then
// the gradient k_soft (q g - q c) + k_hard (q - onehot) written from the scratch: the inputs are
// read twice (the second time mostly from cache) and the gradient is the one write to memory.
// The loss is the two-kernel path's bitwise, the gradient up to rounding (the same element math
// in other loops; measured: at most a few ulps apart, for the mixture divergences).
// Rows this path does not cover (ignored rows, no soft term, a hard term at T != 1, a label out
// of range) take forward_row + backward_row on the same row, which gives the same values.
template <class S, int DIV>
void fused_row(const EnsembleArgs& e, Work& wk, int64_t r) {
  const RowsArgs& a = e.rows;
  const RowCtx c = row_context(a, r);
  if (c.ignored || !c.soft || c.hard_separate || c.bad_label) {
    forward_row<S, DIV>(e, wk, r);
    backward_row<S, DIV>(e, wk, r);
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  wk.set_row<S>(e, r);
  const int64_t V = a.V;
  const float invT = 1.0f / a.temperature, param = a.param;
  alignas(64) float bb[BLK], lpb[BLK], gb[BLK];

  LogNorm nb, ns;
  const bool nan_norm = stats_pass<S>(c, wk, s, V, invT, nb, ns);
  double sphi = 0., sqg = 0.;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    float* __restrict xb = wk.x + j0;
    float* __restrict yb = wk.y + j0;
    logp_block<S>(wk, j0, n, invT, lpb);
    load_block(s + j0, bb, n);
    double bphi = 0., bqg = 0.;
#pragma omp simd reduction(+ : bphi, bqg)
    for (int i = 0; i < n; ++i) {
      const float lp = lpb[i], lq = log_prob_scaled(bb[i], nb, invT);
      const float q = exp_fast(lq);
      float phi, qg;
      div_terms<DIV>(lp, lq, exp_fast(lp), q, param, phi, qg);
      xb[i] = qg;
      yb[i] = q;
      bphi += phi;
      bqg += qg;
    }
    sphi += bphi;
    sqg += bqg;
  }
  const float D = nan_norm ? NAN : (float)sphi;
  const float cc = DIV == FORWARD_KL ? -1.f : (float)sqg;
  const float ce = c.hard ? hard_ce(ns, load_one(s + c.label)) : 0.f;  // ns = nb: T = 1 here
  a.loss[r] = row_loss(true, a.soft_weight, a.temperature, D, c.hard, a.hard_weight, ce);

  if (!grad_defined(cc)) {
    fill_row(g, V, NAN);  // an infinite term in the gradient: NaN row (docs/precision.md)
    return;
  }
  const float gl = a.grad_loss[r];
  const float k_soft = gl * a.soft_weight * a.temperature;
  const float k_hard = c.hard ? gl * a.hard_weight : 0.f;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    const float* __restrict xb = wk.x + j0;
    const float* __restrict yb = wk.y + j0;
    if (c.hard) {
#pragma omp simd
      for (int i = 0; i < n; ++i) gb[i] = grad_element(k_soft, xb[i], yb[i], cc, k_hard, yb[i], 0.f);
      if (c.label >= j0 && c.label < j0 + n) gb[c.label - j0] -= k_hard;
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) gb[i] = k_soft * (xb[i] - yb[i] * cc);
    }
    store_stream(gb, g + j0, n);
  }
}

enum RunMode { FWD = 0, BWD = 1, FUSED = 2 };

template <class S>
void run_rows(const EnsembleArgs& e, int64_t r0, int64_t r1, int mode) {
  using RowFn = void (*)(const EnsembleArgs&, Work&, int64_t);
  const RowFn fn = with_divergence(e.rows.div, [mode](auto d) -> RowFn {
    if (mode == FWD) return &forward_row<S, d.value>;
    if (mode == BWD) return &backward_row<S, d.value>;
    return &fused_row<S, d.value>;
  });
  if (!fn) return;
  Work wk(e, mode == FUSED);
  for (int64_t r = r0; r < r1; ++r) fn(e, wk, r);
  if (mode == FUSED) stream_fence();  // the gradient's non-temporal stores (fp32)
}

}  // namespace

void cpu_ensemble_forward_rows(const EnsembleArgs& e, int64_t row_begin, int64_t row_end) {
  with_dtype(e.rows.dtype, [&](auto tag) { run_rows<decltype(tag)>(e, row_begin, row_end, FWD); });
}

void cpu_ensemble_backward_rows(const EnsembleArgs& e, int64_t row_begin, int64_t row_end) {
  with_dtype(e.rows.dtype, [&](auto tag) { run_rows<decltype(tag)>(e, row_begin, row_end, BWD); });
}

void cpu_ensemble_forward_grad_rows(const EnsembleArgs& e, int64_t row_begin, int64_t row_end) {
  with_dtype(e.rows.dtype, [&](auto tag) { run_rows<decltype(tag)>(e, row_begin, row_end, FUSED); });
}

}  // namespace kd
