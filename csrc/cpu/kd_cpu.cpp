// CPU row kernels: the passes of DESIGN.md §3 over V-blocks of one row at a time.
//
// Each block of up to BLK elements is converted to fp32 into small stack buffers that stay in
// L1 (raw logits: every exponent is (x - m) / T with the maximum m in raw units, the shift before
// the scaling, kd_math.h RawOnlineKL); the per-element math of kd_math.h then runs in `omp simd` loops that
// the compiler vectorizes (AVX2 + FMA when built with those flags). No [N, V] temporaries: the
// only large write is the gradient. Threading is the caller's (row ranges, see bindings.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kd_dtype.h"
#include "kd_math.h"
#include "kd_rows.h"
#include "kd_switch.h"
#include "kd_cpu_blocks.h"

namespace kd {
namespace {

using namespace cpu_blocks;  // BLK, block loads and maxima, Online, row_context, fill_row, stores

// Sums over the row's V columns of phi and of q g (kd_math.h div_terms) for the normalisers
// na, nb: pass 2 of forward_row, and the whole of given_stats_row (normalisers from elsewhere).
// Summed in double: c adds q g terms as large as |log p| (4e4 for one-hot teachers at
// |logits| 1e4), and q (g - c) cancels them; fp32 lane sums lost ~20 ulps of 4e4 there.
template <class S, int DIV>
void row_sums(const S* s, const S* t, int64_t V, float invT, float param, LogNorm na, LogNorm nb,
              double& sphi, double& sqg) {
  alignas(64) float ab[BLK], bb[BLK];
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    load_block(t + j0, ab, n);  // raw logits: the maxima in na, nb are raw (RawOnlineKL)
    load_block(s + j0, bb, n);
    double bphi = 0., bqg = 0.;
#pragma omp simd reduction(+ : bphi, bqg)
    for (int i = 0; i < n; ++i) {
      const float lp = log_prob_scaled(ab[i], na, invT), lq = log_prob_scaled(bb[i], nb, invT);
      float phi, qg;
      div_terms<DIV>(lp, lq, exp_fast(lp), exp_fast(lq), param, phi, qg);
      bphi += phi;
      bqg += qg;
    }
    sphi += bphi;
    sqg += bqg;
  }
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
  // Maxima in raw logit units (RawOnlineKL): each exponent is (x - m) / T, the shift first.
  RawOnlineKL<DIV> on;
  on.init(invT);
  Online os;
  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    if (c.soft) {
      load_block(t + j0, ab, n);
      load_block(s + j0, bb, n);
      const float nma = raise_max(on.k.ma, block_max(ab, n));
      const float nmb = raise_max(on.k.mb, block_max(bb, n));
      const float offa = safe_max(nma), offb = safe_max(nmb);
      float za = 0.f, zb = 0.f, sacc = 0.f;
      if (DIV == FORWARD_KL || DIV == REVERSE_KL) {
#pragma omp simd reduction(+ : za, zb, sacc)
        for (int i = 0; i < n; ++i) {
          const float ca = (ab[i] - offa) * invT, cb = (bb[i] - offb) * invT;
          const float ea = exp_fast(ca), eb = exp_fast(cb);
          za += ea;
          zb += eb;
          sacc += online_kl_term<DIV>(ca, cb, 0.f, 0.f, ea, eb);
        }
      } else {
        za = sum_exp(ab, n, offa, invT);
        zb = sum_exp(bb, n, offb, invT);
      }
      on.absorb(nma, nmb, za, zb, sacc);
    }
    if (c.hard_separate) {
      load_block(s + j0, xb, n);
      os.raise(block_max(xb, n));
      os.z += sum_exp(xb, n, safe_max(os.m));
    }
  }

  LogNorm na{0.f, 0.f}, nb{0.f, 0.f};
  float cc = 0.f, D = 0.f;
  if (c.soft) {
    na = lognorm_from(on.k.ma, on.k.za);
    nb = lognorm_from(on.k.mb, on.k.zb);
    if (DIV == FORWARD_KL) {
      D = on.k.divergence();
      cc = -1.f;
    } else if (DIV == REVERSE_KL) {
      D = on.k.divergence();
      cc = D + 1.f;
    } else {
      // Pass 2: the divergence and c = sum q g, from the row normalisers.
      double sphi = 0., sqg = 0.;
      row_sums<S, DIV>(s, t, V, invT, a.param, na, nb, sphi, sqg);
      D = (lognorm_nan(na) || lognorm_nan(nb)) ? NAN : sphi;  // NaN input: terms with q = NaN read as 0
      cc = sqg;
    }
  }
  const LogNorm ns = c.hard_separate ? lognorm_from(os.m, os.z) : nb;
  const float ce = !c.hard ? 0.f : c.bad_label ? NAN : hard_ce(ns, load_one(s + c.label));
  a.loss[r] = row_loss(c.soft, a.soft_weight, a.temperature, D, c.hard, a.hard_weight, ce);
  store_row_stats(st, RowStats{na, nb, cc, ns});
}

// Vocab-parallel pass 2 (kd_rows.h cpu_given_stats_rows): with the normalisers (STAT_MA ..
// STAT_LZB) given in a.stats, the sums over this shard's columns of phi and of q g into
// a.partial[2 r], a.partial[2 r + 1]; zeros on ignored rows; NaN sum of phi for NaN normalisers.
template <class S, int DIV>
void given_stats_row(const RowsArgs& a, int64_t r) {
  const RowCtx c = row_context(a, r);
  float* out = a.partial + 2 * r;
  if (c.ignored) {
    out[0] = out[1] = 0.f;
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  const RowStats rs = load_row_stats(a.stats + r * STATS_WIDTH);
  double sphi = 0., sqg = 0.;
  row_sums<S, DIV>(s, t, a.V, 1.0f / a.temperature, a.param, rs.na, rs.nb, sphi, sqg);
  out[0] = (lognorm_nan(rs.na) || lognorm_nan(rs.nb)) ? NAN : (float)sphi;
  out[1] = (float)sqg;
}

// Gradient of one block into gb. MODE 0: soft only; 1: soft + hard at T = 1 (softmax(s) = q);
// 2: soft + hard with its own normaliser ns; 3: hard only.
template <int DIV, int MODE>
void grad_block(const float* __restrict ab, const float* __restrict bb,
                const float* __restrict xb, float* __restrict gb, int n, LogNorm na, LogNorm nb,
                float cc, LogNorm ns, float k_soft, float k_hard, float param, float invT) {
  // reverse KL: cc is c' = sum_k q_k x_k of backward_row; qg - q c = q (x - c') is formed in qg,
  // from the centred scaled logits (ab - ma) / T, (bb - mb) / T (maxima raw, as the CUDA kernel)
  const float krev = DIV == REVERSE_KL ? reverse_kl_offset(na.lz, nb.lz) : 0.f;
  const float crev = cc;
  if (DIV == REVERSE_KL) cc = 0.f;
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    float out;
    if (MODE == 3) {
      out = k_hard * exp_fast(log_prob(xb[i], ns));
    } else {
      const float ca = (ab[i] - na.m) * invT, cb = (bb[i] - nb.m) * invT;
      const float lp = ca - na.lz, lq = cb - nb.lz;
      const float p = exp_fast(lp), q = exp_fast(lq);
      float phi, qg;
      div_terms<DIV>(lp, lq, p, q, param, phi, qg);
      if (DIV == REVERSE_KL) qg = reverse_kl_qg(q, ca, cb, krev, crev);
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
    fill_row(g, V, 0.f);
    return;
  }
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  const RowStats rs = load_row_stats(a.stats + r * STATS_WIDTH);
  const LogNorm na = rs.na, nb = rs.nb, ns = rs.ns;
  const float gl = a.grad_loss[r];
  const float k_soft = c.soft ? gl * a.soft_weight * a.temperature : 0.f;
  // A label outside [0, V) that is not ignore_index (its column lives on another rank of a
  // vocab-parallel group) adds the softmax term and no one-hot; its forward loss is NaN.
  const float k_hard = c.hard ? gl * a.hard_weight : 0.f;
  const float invT = 1.0f / a.temperature, param = a.param;
  const bool soft = c.soft, hard = c.hard, sep = c.hard_separate;
  float cc = rs.c;
  if (DIV == REVERSE_KL && soft) {
    // Reverse KL: d/db_j = q_j (x_j - c') with x_j = (b_j - a_j) - k (k per row, kd_math.h) and
    // c' = sum_k q_k x_k summed here from the same rounded x_k, so that for near one-hot rows
    // at |logits| ~ 1e4 the rounding of the dominant x_j cancels in x_j - c' (as it does in
    // autograd) instead of leaving ulp(1e4)-sized errors. One more read of the row.
    const float k = reverse_kl_offset(na.lz, nb.lz);
    float sum = 0.f;
    for (int64_t j0 = 0; j0 < V; j0 += BLK) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      load_block(t + j0, ab, n);
      load_block(s + j0, bb, n);
      float bs = 0.f;
#pragma omp simd reduction(+ : bs)
      for (int i = 0; i < n; ++i) {
        const float ca = (ab[i] - na.m) * invT, cb = (bb[i] - nb.m) * invT;
        const float q = exp_fast(cb - nb.lz);
        bs += reverse_kl_qx(q, ca, cb, k);
      }
      sum += bs;
    }
    cc = sum;
  }
  if (soft && !grad_defined(cc)) {
    fill_row(g, V, NAN);  // an infinite term in the gradient: NaN row (docs/precision.md)
    return;
  }

  for (int64_t j0 = 0; j0 < V; j0 += BLK) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    if (soft) {
      load_block(t + j0, ab, n);  // raw: the maxima of rs are raw
      load_block(s + j0, bb, n);
    }
    if (sep) load_block(s + j0, xb, n);
    if (soft && !hard)
      grad_block<DIV, 0>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param, invT);
    else if (soft && !sep)  // hard term at T = 1: softmax(s) = q
      grad_block<DIV, 1>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param, invT);
    else if (soft)
      grad_block<DIV, 2>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param, invT);
    else if (hard)
      grad_block<DIV, 3>(ab, bb, xb, gb, n, na, nb, cc, ns, k_soft, k_hard, param, invT);
    else
      std::memset(gb, 0, sizeof(float) * n);
    if (hard && c.label >= j0 && c.label < j0 + n) gb[c.label - j0] -= k_hard;
    store(gb, g + j0, n);
  }
}

// ---- fused forward + gradient (for a grad_loss given in advance, a.grad_loss) -------------------
// The row is read from memory once, in the statistics pass: block by block, t and s are
// converted into the per-thread fp32 scratch rows x and y (V floats each, in L2 for V up to
// ~64k, L3 above), the running maxima (raw logit units, kd_math.h RawOnlineKL) raised, and the
// sums of e^{(t - offa_k)/T}, e^{(s - offb_k)/T} taken against the offsets of block k
// (offs[2k], offs[2k + 1]) and absorbed into the row state (as forward_row); the loads of the
// next block are prefetched so that they overlap the exponentials. Forward and reverse KL
// accumulate their loss there too and keep the exponentials (and reverse KL the centred
// d = (s - offb)/T - (t - offa)/T) in the scratch; TVD and the linear mixtures keep the
// exponentials; the log-space mixtures keep t and s.
// Then, for all but forward / reverse KL, one pass from the scratch forms the loss terms and
// qg = q g, q (kept in the scratch in place of what was there) and sums the loss and c = sum q g;
// the last pass writes the gradient k_soft (qg - q c) + k_hard q. The gradient is the only write
// to memory. Rows this path does not cover (ignored rows, no soft term, a hard term at T != 1, a
// label out of range) take the two-kernel path forward_row + backward_row with the same grad_loss,
// which gives the same values.
template <class S, int DIV, bool LIN>
void fused_row(const RowsArgs& a, int64_t r, float* __restrict x, float* __restrict y,
               float* __restrict offs) {
  const RowCtx c = row_context(a, r);
  if (c.ignored || !c.soft || c.hard_separate || c.bad_label) {
    forward_row<S, DIV>(a, r);
    backward_row<S, DIV>(a, r);
    return;
  }
  constexpr bool online = is_online(DIV);
  // LIN (mixtures, mix_linear_ok): keep the exponentials and form the terms from p and q
  constexpr bool keep_exps = DIV == FORWARD_KL || DIV == TVD || LIN;
  const S* s = static_cast<const S*>(a.student) + student_offset(a, r);
  const S* t = static_cast<const S*>(a.teacher) + teacher_offset(a, r);
  S* g = static_cast<S*>(a.grad) + r * a.V;
  const int64_t V = a.V;
  const float invT = 1.0f / a.temperature, param = a.param;

  // The statistics pass (the one read of the row from memory).
  RawOnlineKL<DIV> on;  // maxima in raw logit units: exponents (x - m) / T, the shift first
  on.init(invT);
  for (int64_t j0 = 0, k = 0; j0 < V; j0 += BLK, ++k) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    float* __restrict xb = x + j0;
    float* __restrict yb = y + j0;
    prefetch_block(t + j0 + BLK, std::min<int64_t>(BLK, V - j0 - BLK));
    prefetch_block(s + j0 + BLK, std::min<int64_t>(BLK, V - j0 - BLK));
    const float nma = raise_max(on.k.ma, load_block_max(t + j0, xb, n));
    const float nmb = raise_max(on.k.mb, load_block_max(s + j0, yb, n));
    const float offa = safe_max(nma), offb = safe_max(nmb);
    offs[2 * k] = offa;
    offs[2 * k + 1] = offb;
    float bza = 0.f, bzb = 0.f, bacc = 0.f;
#pragma omp simd reduction(+ : bza, bzb, bacc)
    for (int i = 0; i < n; ++i) {
      const float ca = (xb[i] - offa) * invT, cb = (yb[i] - offb) * invT;
      const float ea = exp_nonpos(ca), eb = exp_nonpos(cb);
      bza += ea;
      bzb += eb;
      if (online) bacc += online_kl_term<DIV>(ca, cb, 0.f, 0.f, ea, eb);
      if (keep_exps) {
        xb[i] = ea;
        yb[i] = eb;
      } else if (DIV == REVERSE_KL) {
        xb[i] = cb - ca;  // small where q matters, even at |logits| ~ 1e4
        yb[i] = eb;
      }  // the log-space mixtures keep the raw logits
    }
    on.absorb(nma, nmb, bza, bzb, bacc);
  }
  const float ma = on.k.ma, mb = on.k.mb, za = on.k.za, zb = on.k.zb;
  const float offa = safe_max(ma), offb = safe_max(mb);
  // Factors that bring the exponentials kept against block k's offsets to the row's.
  auto block_fa = [&](int64_t k) { return rescale(offs[2 * k], offa, invT); };
  auto block_fb = [&](int64_t k) { return rescale(offs[2 * k + 1], offb, invT); };

  float D, cc = 0.f;
  if (online) {
    D = on.k.divergence();
  } else {
    // The loss terms and c; qg and q replace what the scratch held.
    const LogNorm na = lognorm_from(ma, za), nb = lognorm_from(mb, zb);
    const float inv_za = 1.0f / za, inv_zb = 1.0f / zb;
    alignas(64) float pb[BLK];
    // Summed in double: c adds q g terms as large as |log p| (4e4 for one-hot teachers at
    // |logits| 1e4), and q (g - c) cancels them; fp32 lane sums lost ~20 ulps of 4e4 there.
    // (A loop of its own: double accumulators next to the element math ran out of registers.)
    double sphi = 0., sqg = 0.;
    for (int64_t j0 = 0, k = 0; j0 < V; j0 += BLK, ++k) {
      const int n = (int)std::min<int64_t>(BLK, V - j0);
      float* __restrict xb = x + j0;
      float* __restrict yb = y + j0;
      if (DIV == TVD || LIN) {
        // p and q from the kept exponentials, rounded in a loop of their own: in the loop below
        // the compiler would contract p - q into an FMA, and identical rows must give p - q = 0.
        const float kpk = inv_za * block_fa(k), kqk = inv_zb * block_fb(k);
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          xb[i] *= kpk;
          yb[i] *= kqk;
        }
      }
      if (LIN) {
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          float phi, qg;
          mix_terms_linear<DIV>(xb[i], yb[i], param, phi, qg);
          pb[i] = phi;
          xb[i] = qg;  // yb keeps q
        }
      } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        float p = 0.f, q = 0.f, lp = 0.f, lq = 0.f;
        if (DIV == TVD) {
          p = xb[i];
          q = yb[i];
        }
        float phi, qg;
        if (DIV == TVD) {
          div_terms<DIV>(lp, lq, p, q, param, phi, qg);
        } else {
          lp = log_prob_scaled(xb[i], na, invT);
          lq = log_prob_scaled(yb[i], nb, invT);
          q = mix_div_terms<DIV>(lp, lq, param, phi, qg);
        }
        pb[i] = phi;
        xb[i] = qg;
        yb[i] = q;
      }
      }
      double bphi = 0., bqg = 0.;
#pragma omp simd reduction(+ : bphi, bqg)
      for (int i = 0; i < n; ++i) {
        bphi += pb[i];
        bqg += xb[i];
      }
      sphi += bphi;
      sqg += bqg;
    }
    D = (lognorm_nan(na) || lognorm_nan(nb)) ? NAN : sphi;  // NaN input: q = NaN terms read as 0
    cc = D != D ? NAN : sqg;
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
  // reverse KL: log q - log p - D = d - shift_k with d = (b - offb_k) - (a - offa_k)
  const float lza = online ? std::log(za) : 0.f, lzb = online ? std::log(zb) : 0.f;
  auto block_shift = [&](int64_t k) {
    return ((offb - offs[2 * k + 1]) * invT + lzb) - ((offa - offs[2 * k]) * invT + lza) + D;
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
  if (!grad_defined(DIV == REVERSE_KL ? cprime : cc)) {
    fill_row(g, V, NAN);  // an infinite term in the gradient: NaN row (docs/precision.md)
    return;
  }
  for (int64_t j0 = 0, k = 0; j0 < V; j0 += BLK, ++k) {
    const int n = (int)std::min<int64_t>(BLK, V - j0);
    const float* __restrict xb = x + j0;
    const float* __restrict yb = y + j0;
    const float fa = online ? block_fa(k) : 1.f, fb = online ? block_fb(k) : 1.f;
    const float kpk = kp * fa, kqk = kq * fb, inv_zbk = inv_zb * fb;
    const float shift_k = DIV == REVERSE_KL ? block_shift(k) : 0.f;
    // kd_math.h: the larger factor outside (kp, kq have the sign of grad_loss)
    if (DIV == FORWARD_KL && !(std::fabs(kpk) > std::fabs(kqk))) {
      const float r = kqk != 0.f ? kpk / kqk : 0.f;
#pragma omp simd
      for (int i = 0; i < n; ++i) gb[i] = forward_kl_grad_q_major(xb[i], yb[i], r, kqk);
    } else if (DIV == FORWARD_KL) {
      const float r = kqk / kpk;
#pragma omp simd
      for (int i = 0; i < n; ++i) gb[i] = forward_kl_grad_p_major(xb[i], yb[i], r, kpk);
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        if (DIV == REVERSE_KL)
          gb[i] = reverse_kl_grad_from_exps(yb[i], xb[i], inv_zbk, shift_k, cprime, k_soft, k_hard);
        else
          gb[i] = grad_element(k_soft, xb[i], yb[i], cc, k_hard, yb[i], 0.f);
      }
    }
    if (c.hard && c.label >= j0 && c.label < j0 + n) gb[c.label - j0] -= k_hard;
    store_stream(gb, g + j0, n);
  }
}

// Rows are taken chunk by chunk from a shared counter until none is left, so a thread that the
// machine slows down does not hold the others up. Each row is computed by one thread alone, so the
// results do not depend on the thread count or on which thread took a row.
template <class S>
void run_fused(const RowsArgs& a, std::atomic<int64_t>& next, int64_t chunk) {
  using FusedFn = void (*)(const RowsArgs&, int64_t, float*, float*, float*);
  const bool lin = a.div != FORWARD_KL && a.div != REVERSE_KL && a.div != TVD &&
                   mix_linear_ok(a.param);
  const FusedFn fn = with_divergence(a.div, [lin](auto d) -> FusedFn {
    constexpr bool mix = d.value == JSD || d.value == SKEW_KL || d.value == SKEW_REVERSE_KL;
    if constexpr (mix) return lin ? &fused_row<S, d.value, true> : &fused_row<S, d.value, false>;
    return &fused_row<S, d.value, false>;
  });
  if (!fn) return;
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
void run_given_stats(const RowsArgs& a, int64_t r0, int64_t r1) {
  using RowFn = void (*)(const RowsArgs&, int64_t);
  const RowFn fn = with_divergence(a.div, [](auto d) -> RowFn { return &given_stats_row<S, d.value>; });
  if (!fn) return;
  for (int64_t r = r0; r < r1; ++r) fn(a, r);
}

template <class S>
void run_rows(const RowsArgs& a, int64_t r0, int64_t r1, bool fwd) {
  using RowFn = void (*)(const RowsArgs&, int64_t);
  const RowFn fn = with_divergence(a.div, [fwd](auto d) -> RowFn {
    return fwd ? &forward_row<S, d.value> : &backward_row<S, d.value>;
  });
  if (!fn) return;
  for (int64_t r = r0; r < r1; ++r) fn(a, r);
}

}  // namespace

void cpu_forward_rows(const RowsArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.div == LOGIT_MSE) return cpu_mse_forward_rows(a, row_begin, row_end);  // mse_cpu.cpp
  with_dtype(a.dtype, [&](auto tag) { run_rows<decltype(tag)>(a, row_begin, row_end, true); });
}

void cpu_given_stats_rows(const RowsArgs& a, int64_t row_begin, int64_t row_end) {
  with_dtype(a.dtype, [&](auto tag) { run_given_stats<decltype(tag)>(a, row_begin, row_end); });
}

void cpu_forward_grad_rows(const RowsArgs& a, std::atomic<int64_t>& next, int64_t chunk) {
  if (a.div == LOGIT_MSE) return cpu_mse_forward_grad_rows(a, next, chunk);
  with_dtype(a.dtype, [&](auto tag) { run_fused<decltype(tag)>(a, next, chunk); });
}

void cpu_backward_rows(const RowsArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.div == LOGIT_MSE) return cpu_mse_backward_rows(a, row_begin, row_end);
  with_dtype(a.dtype, [&](auto tag) { run_rows<decltype(tag)>(a, row_begin, row_end, false); });
}

}  // namespace kd
