"""Triton kernels for the knowledge-distillation row losses (DESIGN.md §3). ``@triton.jit`` only.

One program handles one row (token) and walks its vocabulary in blocks of ``BLOCK`` columns.
Notation as in DESIGN.md: a = t/T, b = s/T, A = logsumexp(a), B = logsumexp(b),
log p = a - A, log q = b - B. The divergence id ``DIV`` (kdkernels.divergences) is a
compile-time constant; β/α, T and the weights are runtime values.

Forward (``kd_fwd_kernel``), per row:
  pass 1 reads s and t once: online (max, sum-exp) of a and b (per group of 4 adjacent columns,
    ``_stats_pass``; per lane for reverse KL outside the fused kernel), of s at T = 1 when the
    hard term is on, and for forward / reverse KL the loss itself (the fused kernel's forward KL:
    in its gradient pass instead; its reverse KL: from c = E_q[x], see ``_row_loss``),
    accumulated online as
    KL(p||q) = Σ p ((a - ma) - (b - mb)) - log za + log zb  (za, zb the sum-exps at maxima
    ma, mb; the sum is rescaled like the sum-exp as the maxima move).
    Bytes moved (bf16): 4 per element.
  pass 2 (jsd, skew_kl, skew_reverse_kl, tvd only) reads s and t again, now that A and B are
    known, to form p, q and m: the loss and c = Σ q g (per-lane sums). Another 4 bytes per
    element. On the GPU its ratios and logs are the hardware approximations (fast_div,
    fast_log; docs/precision.md).
  It writes per row: loss and stats = (mt, log za, ms, log zb, c, mx, log zx), fp32: the maxima
  of the raw teacher and student logits, the log sum-exps of a and b centred on them, c, and the
  same pair for s at T = 1 (hard term).
Precision: maxima are kept in raw logit units and every log-probability is formed as
  log p = (t - mt)·(1/T) - log za, i.e. the shift happens before the scaling. t - mt is exact near
  the maximum (Sterbenz), so at |logits| ~ 1e4 or T ~ 0.05 the log-probabilities of the likely
  tokens carry no rounding error of the size of ulp(t/T), and identical or shifted rows (ties)
  give differences that cancel exactly.
Backward (``kd_bwd_kernel``) reads s and t once more and writes, in the student's dtype,
  grad_loss · (soft_weight · T · q (g - c) + hard_weight · (softmax(s) - onehot(label)))
  (6 bytes per element in bf16). It may write into the student's own storage (in-place
  gradient): every element is read before the same program overwrites it.

The constant parts of g (the "+1" of reverse KL and skew reverse KL) cancel in g - c and are
left out of both g and c here, which keeps c small and the difference accurate.
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import STATS_WIDTH

# Divergence ids (kdkernels.divergences; never renumbered there).
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
STATS = tl.constexpr(STATS_WIDTH)  # per-row fp32 statistics, see the module docstring
# The divergences whose terms take the linear form (mix_terms_linear) for parameters >= 2^-60:
# the LIN constexpr of the kernels (launch.py _linear, aot.py).
LINEAR_DIVS = (2, 3, 4)  # jsd, skew_kl, skew_reverse_kl
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# triton.jit's own rule: under TRITON_INTERPRET=1 the kernels run in numpy, which has no PTX
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# 2^-126, the smallest normal fp32, exactly: triton types a float literal below 2^-126 as fp64
# (semantic.py), which widened every comparison with it to fp64 (1.17549435e-38 until 2026-12-03)
TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def safe_max(m):
    """The running max, with -inf replaced by 0 so that x - m never gives -inf - (-inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def lane_term(x, f):
    """A lane's share x·f of the row's sum in the merge of the lanes. x = +inf (an element with
    q > 0 = p in reverse KL, p > 0 = q in forward KL) stays +inf where the lane's weight f
    underflows to 0 at a small T: the lane's true weight is positive (its max is finite), and
    inf·0 would turn the row's +inf into NaN."""
    return tl.where(x == float("inf"), x, x * f)


@triton.jit
def fast_log(x):
    """ln x for the mixture logs on the GPU: MUFU.LG2 times ln 2 (libdevice ``__nv_fast_logf``,
    lg2.approx.ftz: CUDA's ``__logf``, the intrinsic the CUDA backend's ``--use_fast_math`` build
    uses for every log; max absolute error 2^-21.41 for x in [0.5, 2], 3 ulp elsewhere, per the
    CUDA C++ Programming Guide's intrinsic-function table) in 2 instructions, where ``tl.log`` is
    libdevice's ~20-instruction polynomial. Inputs below 2^-126 flush to 0 (log -inf): callers
    pass normal numbers or guard. The interpreter has no PTX: there it is ``tl.log``."""
    if INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.fast_logf(x)


@triton.jit
def fast_log2(x):
    """log2 x on the GPU: libdevice ``__nv_fast_log2f`` (lg2.approx.ftz, one MUFU.LG2; CUDA's
    ``__log2f``), as ``fast_log`` without its multiply by ln 2. The interpreter: ``tl.log2``."""
    if INTERPRETED:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def fast_div(x, y):
    """x / y for 2^-126 <= y <= 1 on the GPU: libdevice ``__nv_fast_fdividef`` (div.approx.ftz:
    CUDA's ``__fdividef``, the division of the CUDA backend's ``--use_fast_math`` build; 2 ulp
    for y in [2^-126, 2^126] per the CUDA C++ Programming Guide), a reciprocal and a multiply,
    where ``/`` is div.full.f32 (~16 SASS instructions). The interpreter: ``/``."""
    if INTERPRETED:
        return x / y
    else:
        return libdevice.fast_dividef(x, y)


@triton.jit
def log2_prob(x, m, k2, l2):
    """log2 of e^{(x - m)/T - l}: (x - m)·k2 - l2 with k2 = log2(e)/T, l2 = l·log2(e)."""
    return (x - m) * k2 - l2


@triton.jit
def exp2_from(x, m, k2, l2):
    """e^{(x - m)/T - l} as exp2((x - m)·k2 - l2), k2 = log2(e)/T, l2 = l·log2(e): one FFMA and
    one MUFU.EX2 (tl.exp2 is ex2.approx.ftz; tl.exp adds a multiply and a subnormal fix-up).
    Results below 2^-126 flush to 0 (probabilities of that size contribute nothing)."""
    return tl.exp2(log2_prob(x, m, k2, l2))


@triton.jit
def _log_mix(w1, x, y):
    """log(w1 e^x + (1 - w1) e^y) for log-probabilities x, y (0 <= w1 < 1).

    Factored as hi + log(w_hi + w_lo e^(lo - hi)); x == y gives exactly x (identical
    distributions give an exact 0 divergence); -inf where both are -inf, never NaN. A w_hi below
    2^-60 (parameters down to 2^-126) with e^(lo - hi) < 2^-115 is summed scaled by 2^64: both
    parts are then below 2^-126, where the GPU's exp flushes to 0 (csrc/include/kd_math.h)."""
    w2 = 1.0 - w1
    x_hi = x >= y
    hi = tl.where(x_hi, x, y)
    lo = tl.where(x_hi, y, x)
    w_hi = tl.where(x_hi, w1, w2)
    w_lo = tl.where(x_hi, w2, w1)
    d = lo - safe_max(hi)
    # w_hi < 2^-60 and e^d < 2^-115: both parts scaled by 2^64, the log shifted back by 64 ln 2
    scaled = ((w_hi < 8.67361738e-19) & (d < -80.0)).to(tl.float32)
    shift = scaled * 44.3614195558365
    # the log's argument is >= w_hi (scaled: >= 2^-62) or >= w_lo e^-80: normal, fast_log is safe
    arg = w_hi * (1.0 + scaled * 1.8446744e19) + w_lo * tl.exp2((d + shift) * LOG2E)
    out = hi + (fast_log(arg) - shift)
    out = tl.where(x == y, x, out)  # exact, whatever w1 + (1 - w1) and the log of 1 round to
    return tl.where(w_hi == 0.0, lo, out)  # w_hi = 0: m is the other distribution (w_lo = 1)


@triton.jit
def _ratio(x, m):
    """x / m for the linear mixture terms (x <= m / param, m <= 1): exactly 1 where x == m
    (identical rows must give an exact 0, and the GPU's fast division, a reciprocal times x,
    need not), 0 where m < 2^-126 (then x < 2^-126 / param <= 2^-66: terms below 2^-66 · 42,
    taken as 0; fast_div flushes such m to 0)."""
    small = m < TINY
    return tl.where(x == m, 1.0, tl.where(small, 0.0, fast_div(x, tl.where(small, 1.0, m))))


@triton.jit
def _xlog_ratio(x, r):
    """x·log r with r = x / m: 0 where r < 2^-126 (x = 0, or x far below m: the term is below
    2^-126 · 87 in size; fast_log would flush r to 0), NaN stays NaN."""
    return tl.where(r < TINY, 0.0, x * fast_log(r))


@triton.jit
def mix_terms_linear(DIV: tl.constexpr, p, q, lp2, lq2, param):
    """φ and q·g of jsd, skew_kl and skew_reverse_kl from p and q themselves (jsd also from
    lp2 = log2 p, lq2 = log2 q, the exponents they were formed from) (kd_math.h
    mix_terms_linear, the CPU's form; jsd as kd_math.h jsd_terms_log2): m formed in linear
    space, one division and one log per element (jsd: one log, no division), where the log-space form of ``terms`` takes a log and an exp for log m and another
    exp and log for the weighted ratio. Only for parameters >= 2^-60 (the launcher's LIN: an m
    that underflows while p or q does not then needs p or q below 2^-126 / param <= 2^-66, and
    that element's term, below 2^-66 · log 2^60, is taken as 0). m = q + α (p - q) is exactly q
    when p == q, so identical rows still give exactly 0. q·g without its constant part, as
    ``terms``."""
    if DIV == JSD:  # m = β p + (1 - β) q; q g = (1 - β) q log(q / m) (+ constants, dropped)
        # log(p/m) = (log2 p - log2 m) ln 2 from the exponents p and q were formed from: one log,
        # no division (kd_math.h jsd_terms_log2, the CUDA kernels' form and its error analysis).
        # p == q (identical rows) takes log2 m = log2 q: an exact 0; -inf exponents raised to
        # -256 so that a zero p or q gives 0 * finite; m below 2^-126 reads as 2^-126.
        m = q + param * (p - q)
        lpc = tl.maximum(lp2, -256.0)
        lqc = tl.maximum(lq2, -256.0)
        lm2 = tl.where(p == q, lqc, fast_log2(tl.maximum(m, TINY)))
        tq = (1.0 - param) * LN2 * (q * (lqc - lm2))
        phi = param * LN2 * (p * (lpc - lm2)) + tq
        qg = tq
    elif DIV == SKEW_KL:  # m = α p + (1 - α) q; q g = -(1 - α) q p / m
        m = q + param * (p - q)
        r = _ratio(p, m)
        phi = _xlog_ratio(p, r)
        qg = -(1.0 - param) * q * r
    else:  # SKEW_REVERSE_KL: m = α q + (1 - α) p; q g = q (log(q / m) - α q / m) (+ q, dropped)
        m = p + param * (q - p)
        r = _ratio(q, m)
        small = r < TINY  # q far below m (or 0): the terms are ~ 0, as _xlog_ratio
        lr = fast_log(tl.where(small, 1.0, r))
        phi = tl.where(small, 0.0, q * lr)
        qg = tl.where(small, 0.0, q * (lr - param * r))
    return phi, qg


@triton.jit
def terms(DIV: tl.constexpr, LIN: tl.constexpr, logp, logq, lp2, lq2, p, q, param):
    """Per-element φ(p, q) and q·g, g = ∂φ/∂q (up to an additive constant), of divergence DIV.

    ``param`` is β (jsd: m = β p + (1-β) q) or α (skew_kl: m = α p + (1-α) q,
    skew_reverse_kl: m = α q + (1-α) p). Zero-probability entries contribute 0 (0·log 0 = 0).
    LIN (the launcher's choice: skew_kl or skew_reverse_kl with param >= 2^-60) takes the linear
    form ``mix_terms_linear``; otherwise the log-space form below, which holds for any parameter.
    q·g is returned rather than g because g alone can overflow (skew KL at α = 0: g = -p/q) while
    q·g is bounded; weighted ratios w·q/m <= 1 are formed as exp(log w + log q - log m) with the
    exponent capped at 0, so a weight of 0 gives 0, never 0·inf. The guards test == 0, not > 0,
    so that a NaN probability stays NaN.
    """
    zero = tl.zeros_like(p)
    if LIN:
        phi, qg = mix_terms_linear(DIV, p, q, lp2, lq2, param)
    elif DIV == FORWARD_KL:
        phi = tl.where(p == 0, zero, p * (logp - logq))
        qg = -p
    elif DIV == REVERSE_KL:
        phi = tl.where(q == 0, zero, q * (logq - logp))
        qg = phi
    elif DIV == JSD:
        logm = _log_mix(param, logp, logq)
        qg = (1.0 - param) * tl.where(q == 0, zero, q * (logq - logm))
        phi = param * tl.where(p == 0, zero, p * (logp - logm)) + qg
    elif DIV == SKEW_KL:
        logm = _log_mix(param, logp, logq)
        phi = tl.where(p == 0, zero, p * (logp - logm))
        # (1 - α) q / m
        w = tl.exp2(tl.minimum((tl.log(zero + (1.0 - param)) + logq - logm) * LOG2E, 0.0))
        qg = tl.where(p == 0, zero, -p * w)
    elif DIV == SKEW_REVERSE_KL:
        logm = _log_mix(param, logq, logp)
        phi = tl.where(q == 0, zero, q * (logq - logm))
        w = tl.exp2(tl.minimum((tl.log(zero + param) + logq - logm) * LOG2E, 0.0))  # α q / m
        qg = tl.where(q == 0, zero, q * (logq - logm - w))
    else:  # TVD; sign(0) = 0 at ties
        phi = 0.5 * tl.abs(p - q)
        qg = q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, zero))
    return phi, qg


@triton.jit
def row_setup(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl, ignore_index,
               HAS_LABELS: tl.constexpr):
    """int64 offsets of the row in the student [B, s_L, V] and teacher [B', t_L, Vt] views (the
    two may split their N rows differently), its label and whether it counts."""
    s_off = (row // s_L) * s_sb + (row % s_L) * s_sl
    t_off = (row // t_L) * t_sb + (row % t_L) * t_sl
    if HAS_LABELS:
        label = tl.load(lab_ptr + row)
        valid = label != ignore_index
    else:
        label = tl.full([], -1, tl.int64)
        valid = row >= 0  # every row counts
    return s_off, t_off, label, valid


GROUP = tl.constexpr(4)  # adjacent columns per group of the statistics pass
# The fused reverse KL re-sums c on the row's maxima where its centres are farther from them
# than this, |mb - cs| + |ma - ct| in units of T (first_block_centres): the extra rounding of x,
# ~ε·16·T² in the loss, stays below the ~ε·(1 + ln V)·T² of the normalisers (V > BLOCK, else the
# centres are the maxima)
FAR_CENTRES = tl.constexpr(16.0)


@triton.jit
def first_block_centres(s_row, t_row, n, NEED: tl.constexpr, BLOCK: tl.constexpr):
    """(cs, ct): the maxima of s and t over the row's first BLOCK columns where finite, else 0,
    the fixed centres of the fused reverse-KL numerator x = (s - cs) - (t - ct). x is rounded the
    same way in both passes whatever the centres; centres near the row's likely tokens keep that
    rounding small (a column far below them, e.g. column 0 at -3000, would cost ulp(3000) on
    every x: test_contract.py::test_underflow_no_nan). The statistics pass then reads the same
    block first. n: the row's width, 0 for an ignored row. Without NEED, or for n = 0, (0, 0) and
    no load."""
    if NEED:
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        cs = tl.max(tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32), 0)
        ct = tl.max(tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32), 0)
        cs = tl.where(tl.abs(cs) < float("inf"), cs, 0.0)
        ct = tl.where(tl.abs(ct) < float("inf"), ct, 0.0)
    else:
        cs = tl.zeros([], tl.float32)
        ct = tl.zeros([], tl.float32)
    return cs, ct


@triton.jit
def _stats_pass(s_row, t_row, n, V, k2, cs, ct, KL: tl.constexpr, RKL: tl.constexpr,
                HARD: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr):
    """Pass 1 with the soft term: per group of G adjacent columns (one thread's vector of a
    [BLOCK / G, G] block, so the max over a group takes no shuffle), the online (max, sum-exp)
    of t and s and, with KL (forward KL in forward_rows), the centred KL numerator, as the CUDA
    kernel's per-chunk update: the group's maxima are raised once per block and its
    old sums rescaled once (one exp2 each); every element then costs one exp2 per distribution
    and no selects on the maxima. Raw logit units throughout (the numerator gets its 1/T after
    the merge); s at T = 1 (hard term) shares the student's maxima. RKL (reverse KL in the fused
    kernel): acc = Σ e^{b-mb} x with x = (s - cs) - (t - ct) centred on fixed centres
    (``first_block_centres``), so that it is only rescaled like zb as the maxima move. Returns
    per-group (ma, za, mb, zb, acc, ms, zs) for the merge."""
    R: tl.constexpr = BLOCK // G
    ninf = float("-inf")
    offs = tl.arange(0, R)[:, None] * G + tl.arange(0, G)[None, :]
    ma = tl.full([R], ninf, tl.float32)
    mb = tl.full([R], ninf, tl.float32)
    za = tl.zeros([R], tl.float32)
    zb = tl.zeros([R], tl.float32)
    acc = tl.zeros([R], tl.float32)
    zs = tl.zeros([R], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
        ma_new = tl.maximum(ma, tl.max(t, 1))  # the group's maxima, raised once per block
        mb_new = tl.maximum(mb, tl.max(s, 1))
        oa = safe_max(ma_new)  # the centres (0 for a part that has seen only -inf)
        ob = safe_max(mb_new)
        da = ma - oa  # <= 0, the move of the old centre; -inf for an empty part (z = 0: guarded)
        db = mb - ob
        ca = t - oa[:, None]  # shift first (exact near the maximum), raw units
        cb = s - ob[:, None]
        ea = tl.exp2(ca * k2)
        eb = tl.exp2(cb * k2)
        # Σ e^{a-ma} ((a - ma) - (b - mb)) for forward KL: the old terms gain (da - db) when
        # re-centred; a term whose weight is 0 is 0 (never 0·inf). (Reverse KL keeps the per-lane
        # pass of _row_loss: docs/gpu_model.md.)
        if KL:
            acc = (acc + tl.where(za == 0, 0.0, za * (da - db))) * tl.exp2(da * k2) + \
                tl.sum(tl.where(ea == 0, 0.0, ea * (ca - cb)), 1)
        if RKL:  # a term whose weight is 0 is 0 (s = -inf: x is -inf or NaN); +inf stays +inf
            x = (s - cs) - (t - ct)
            acc = lane_term(acc, tl.exp2(db * k2)) + tl.sum(tl.where(eb == 0, 0.0, eb * x), 1)
        za = za * tl.exp2(da * k2) + tl.sum(ea, 1)
        zb = zb * tl.exp2(db * k2) + tl.sum(eb, 1)
        if HARD:
            zs = zs * tl.exp2(db * LOG2E) + tl.sum(tl.exp2(cb * LOG2E), 1)
        ma = ma_new
        mb = mb_new
    return ma, za, mb, zb, acc, mb, zs


@triton.jit
def _row_loss(s_row, t_row, label, valid, V, inv_T, param, soft_scale, hard_weight, cs, ct,
              DIV: tl.constexpr, LIN: tl.constexpr, SOFT: tl.constexpr, HARD: tl.constexpr,
              FUSED: tl.constexpr, BLOCK: tl.constexpr):
    """The forward of one row: pass 1 (statistics), for the mixture divergences pass 2 (loss and
    c). Returns the row's loss soft_scale·D + hard_weight·CE (not yet masked) and its statistics
    (ma, lza, mb, lzb, c, ms, lzs), see the module docstring. Ignored rows read no logits.
    FUSED (the fused kernel, ``kd_fwd_grad_kernel``): forward KL keeps no online KL in pass 1 and
    leaves D out of the loss (D = 0 here; the gradient pass sums it); reverse KL takes the
    grouped pass too, its numerator summed on the centres (cs, ct) (``first_block_centres``), and
    returns c = E_q[x] in raw logit units, x = (s - cs) - (t - ct): the gradient pass subtracts
    it from the very same x, so the dominant terms cancel exactly at any row width
    (``_row_grad``'s FUSED)."""
    n = tl.where(valid, V, 0)
    ninf = float("-inf")
    zero = tl.zeros([], tl.float32)
    k2 = inv_T * 1.4426950408889634  # exp((x - m)/T) = exp2((x - m)·k2): the scale folded in
    nk2 = -k2
    # Online state per group (_stats_pass) or per lane (hard term alone), with no reduction
    # across threads inside the loop: the groups / lanes merge once after it.
    lane_ninf = tl.full([BLOCK], ninf, tl.float32)
    lane_zero = tl.zeros([BLOCK], tl.float32)
    ma = lane_ninf  # running max and sum-exp of a, per lane (raw logit units)
    za = lane_zero
    mb = lane_ninf  # ... of b
    zb = lane_zero
    acc = lane_zero  # online KL numerator (forward / reverse KL)
    ms = lane_ninf  # ... of s at T = 1 (hard term)
    zs = lane_zero
    s_lab = zero      # s[label], loaded once
    if HARD:
        lab_ok = (label >= 0) & (label < V) & valid
        s_lab = tl.load(s_row + tl.where(lab_ok, label, 0), mask=lab_ok, other=0.0).to(tl.float32)

    # ---- pass 1: statistics (and the forward / reverse KL loss) ----
    if SOFT and (DIV != REVERSE_KL or FUSED):
        ma, za, mb, zb, acc, ms, zs = _stats_pass(
            s_row, t_row, n, V, k2, cs, ct, DIV == FORWARD_KL and not FUSED,
            DIV == REVERSE_KL, HARD, BLOCK, GROUP)
    else:
        # Per lane (reverse KL, the hard term alone): lane j keeps the (max, sum-exp) of the
        # columns j, j + BLOCK, ... Each element costs one exp2 per distribution:
        # e = e^{-|x - m|/T} is the new element's weight when x <= m, else the old sum's rescale
        # factor. Reverse KL keeps this form: its c = D is subtracted from log-ratios the
        # gradient pass rounds on its own, and with per-lane maxima a row of V <= BLOCK forms the
        # very same differences x - max (test_regressions.py::
        # test_reverse_kl_one_hot_disjoint_logits_3e4; docs/gpu_model.md on the larger-V case).
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
            if SOFT:  # reverse KL
                t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
                up_a = t > ma  # the lane's max moves to this element
                up_b = s > mb
                ea = tl.where(t == ninf, 0.0, tl.exp2(tl.abs(t - ma) * nk2))  # one FMUL
                eb = tl.where(s == ninf, 0.0, tl.exp2(tl.abs(s - mb) * nk2))
                ma_new = tl.where(up_a, t, ma)
                mb_new = tl.where(up_b, s, mb)
                ra = tl.where(up_a, ea, 1.0)  # rescale of the old sums
                wa = tl.where(up_a, 1.0, ea)  # weight e^{a - ma} of the new element
                rb = tl.where(up_b, eb, 1.0)
                wb = tl.where(up_b, 1.0, eb)
                # Online KL on centred logits: acc = Σ e^{b-mb} ((b - mb) - (a - ma)); when the
                # maxima move by (da, db) the old terms gain z·(da - db) before the rescaling.
                # Centring keeps the terms small: V = 1 or identical rows give an exact 0 and
                # |logits| ~ 1e4 lose no precision. Raw logit units: acc gets its 1/T after the
                # merge. ma needs safe_max (p = 0 < q is a +inf term, not NaN), mb does not
                # (where it is -inf so is s, wb = 0 and the select drops the NaN).
                da = tl.where(up_a, ma_new - ma, 0.0)
                db = tl.where(up_b, mb_new - mb, 0.0)
                ca = t - safe_max(ma_new)
                cb = s - mb_new
                shift = tl.where(zb == 0, 0.0, zb * (da - db))
                acc = (acc + shift) * rb + tl.where(wb == 0, 0.0, wb * (cb - ca))
                za = za * ra + wa
                zb = zb * rb + wb
                ma = ma_new
                mb = mb_new
            if HARD:
                up_s = s > ms
                es = tl.where(s == ninf, 0.0, tl.exp2(tl.abs(s - ms) * -1.4426950408889634))
                zs = tl.where(up_s, zs * es + 1.0, zs + es)
                ms = tl.where(up_s, s, ms)

    # ---- the one merge of the lanes ----
    if SOFT:
        ma_r = tl.max(ma, 0)
        mb_r = tl.max(mb, 0)
        fa = tl.exp2((ma - safe_max(ma_r)) * k2)
        fb = tl.exp2((mb - safe_max(mb_r)) * k2)
        if DIV == FORWARD_KL and not FUSED:
            d = tl.where(mb == mb_r, 0.0, mb_r - mb) - tl.where(ma == ma_r, 0.0, ma_r - ma)
            acc_r = tl.sum(lane_term(acc + tl.where(za == 0, 0.0, za * d), fa), 0) * inv_T
        elif DIV == REVERSE_KL and FUSED:  # sums of x need no re-centring: raw units
            acc_r = tl.sum(lane_term(acc, fb), 0)
        elif DIV == REVERSE_KL:
            d = tl.where(ma == ma_r, 0.0, ma_r - ma) - tl.where(mb == mb_r, 0.0, mb_r - mb)
            acc_r = tl.sum(lane_term(acc + tl.where(zb == 0, 0.0, zb * d), fb), 0) * inv_T
        else:
            acc_r = zero
        za_r = tl.sum(za * fa, 0)
        zb_r = tl.sum(zb * fb, 0)
    else:
        ma_r = zero + ninf
        mb_r = zero + ninf
        acc_r = zero
        za_r = zero
        zb_r = zero
    if HARD:
        ms_r = tl.max(ms, 0)
        zs_r = tl.sum(zs * tl.exp2((ms - safe_max(ms_r)) * 1.4426950408889634), 0)
    else:
        ms_r = zero + ninf
        zs_r = zero
    acc = acc_r
    za = za_r
    zb = zb_r

    lza = tl.log(za)
    lzb = tl.log(zb)
    lzs = tl.log(zs_r)
    ma = safe_max(ma_r)
    mb = safe_max(mb_r)
    ms = safe_max(ms_r)
    div = zero
    c = zero
    if SOFT:
        if DIV == FORWARD_KL:
            if not FUSED:  # one log of a ratio near 1: no log V cancellation
                div = acc / za + tl.log(zb / za)
            c = zero - 1.0
        elif DIV == REVERSE_KL and FUSED:
            c = acc / zb  # E_q[x]; D = E_q[log q - log p]
            # Centres far from the row's maxima (its first block far below the likely tokens)
            # cost the rounding of x ~ ulp of that distance: such a row re-centres on the
            # maxima and sums c again from the gradient's own q and x (one more read of it).
            far = (tl.abs(mb - cs) + tl.abs(ma - ct)) * inv_T > FAR_CENTRES
            cs = tl.where(far, mb, cs)
            ct = tl.where(far, ma, ct)
            lzb2 = lzb * LOG2E
            c_l = lane_zero
            for start in range(0, tl.where(far, n, 0), BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
                q = exp2_from(s, mb, k2, lzb2)
                c_l += tl.where(q == 0, 0.0, q * ((s - cs) - (t - ct)))
            c = tl.where(far, tl.sum(c_l, 0), c)
            div = (c - ((mb - cs) - (ma - ct))) * inv_T + tl.log(za / zb)
        elif DIV == REVERSE_KL:
            div = acc / zb + tl.log(za / zb)
            c = div
        else:
            # ---- pass 2: divergences that need the statistics before they can form p, q, m ----
            # per-lane sums, one reduction after the loop (no barriers inside it)
            lza2 = lza * LOG2E
            lzb2 = lzb * LOG2E
            div_l = lane_zero
            c_l = lane_zero
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
                logp = (t - ma) * inv_T - lza
                logq = (s - mb) * inv_T - lzb
                lp2 = log2_prob(t, ma, k2, lza2)
                lq2 = log2_prob(s, mb, k2, lzb2)
                p = tl.exp2(lp2)
                q = tl.exp2(lq2)
                phi, qg = terms(DIV, LIN, logp, logq, lp2, lq2, p, q, param)
                div_l += phi
                c_l += qg
            div = tl.sum(div_l, 0)
            c = tl.sum(c_l, 0)
    total = soft_scale * div
    if HARD:
        in_range = (label >= 0) & (label < V)
        ce = tl.where(in_range, (ms - s_lab) + lzs, float("nan"))
        total += hard_weight * ce
    return total, ma, lza, mb, lzb, c, ms, lzs, cs, ct


@triton.jit
def kd_fwd_kernel(s_ptr, t_ptr, lab_ptr, loss_ptr, stats_ptr,
                  V, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                  inv_T, param, soft_scale, hard_weight, ignore_index,
                  DIV: tl.constexpr, LIN: tl.constexpr, SOFT: tl.constexpr,
                  HAS_LABELS: tl.constexpr,
                  HARD: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row loss soft_scale·D + hard_weight·CE (0 on ignored rows) and stats (A, B, c, lse).

    soft_scale = soft_weight·T². Ignored rows read no logits (their loop is empty)."""
    row = tl.program_id(0).to(tl.int64)
    s_off, t_off, label, valid = row_setup(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                                            ignore_index, HAS_LABELS)
    total, ma, lza, mb, lzb, c, ms, lzs, _, _ = _row_loss(
        s_ptr + s_off, t_ptr + t_off, label, valid, V, inv_T, param, soft_scale, hard_weight,
        0.0, 0.0, DIV, LIN, SOFT, HARD, False, BLOCK)
    tl.store(loss_ptr + row, tl.where(valid, total, 0.0))
    st = stats_ptr + row * STATS
    tl.store(st + 0, tl.where(valid, ma, 0.0))
    tl.store(st + 1, tl.where(valid, lza, 0.0))
    tl.store(st + 2, tl.where(valid, mb, 0.0))
    tl.store(st + 3, tl.where(valid, lzb, 0.0))
    tl.store(st + 4, tl.where(valid, c, 0.0))
    tl.store(st + 5, tl.where(valid, ms, 0.0))
    tl.store(st + 6, tl.where(valid, lzs, 0.0))


@triton.jit
def kd_bwd_kernel(s_ptr, t_ptr, lab_ptr, stats_ptr, gl_ptr, g_ptr,
                  V, s_L, s_sb, s_sl, t_L, t_sb, t_sl, g_sb, g_sl,
                  inv_T, param, soft_scale, hard_weight, ignore_index,
                  DIV: tl.constexpr, LIN: tl.constexpr, SOFT: tl.constexpr,
                  HAS_LABELS: tl.constexpr,
                  HARD: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row] = grad_loss[row] · (soft_scale · q (g - c) + hard_weight · (softmax(s) - onehot))
    with soft_scale = soft_weight·T; exact zeros on ignored rows. ``g_ptr`` may alias ``s_ptr``."""
    row = tl.program_id(0).to(tl.int64)
    s_off, t_off, label, valid = row_setup(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                                            ignore_index, HAS_LABELS)
    g_off = (row // s_L) * g_sb + (row % s_L) * g_sl
    s_row = s_ptr + s_off
    t_row = t_ptr + t_off
    g_row = g_ptr + g_off
    gl = tl.load(gl_ptr + row).to(tl.float32)
    st = stats_ptr + row * STATS
    ma = tl.load(st + 0)
    lza = tl.load(st + 1)
    mb = tl.load(st + 2)
    lzb = tl.load(st + 3)
    c = tl.load(st + 4)
    ms = tl.load(st + 5)
    lzs = tl.load(st + 6)
    _row_grad(s_row, t_row, g_row, label, valid, V, gl, ma, lza, mb, lzb, c, ms, lzs, 0.0, 0.0,
              inv_T, param, soft_scale, hard_weight, DIV, LIN, SOFT, HARD, False, BLOCK)


@triton.jit
def _row_grad(s_row, t_row, g_row, label, valid, V, gl, ma, lza, mb, lzb, c, ms, lzs, cs, ct,
              inv_T, param, soft_scale, hard_weight,
              DIV: tl.constexpr, LIN: tl.constexpr, SOFT: tl.constexpr, HARD: tl.constexpr,
              FUSED: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient pass of one row from its statistics: writes, in g_row's dtype,
    gl · (soft_scale · q (g - c) + hard_weight · (softmax(s) - onehot)), zeros on ignored rows.
    A label outside [0, V) that is not ignore_index adds the softmax term and no one-hot.
    FUSED (the fused kernel, ``_row_loss``'s FUSED): forward KL also returns
    D = Σ p (log p - log q) of the row, summed per lane from the p and q the gradient uses (the
    statistics pass then needs no online KL: 27 instead of 48 SASS/elem, memory-bound); reverse KL
    takes c = E_q[x] and forms q (g - c) as q (x - c)/T with x = (s - cs) - (t - ct). Otherwise
    returns 0."""
    # the +inf-loss rule (docs/precision.md): an infinite c (reverse KL with p = 0 < q) means an
    # infinite term in the gradient; the whole row is then NaN (kd_bwd_kernel and the fused
    # kd_fwd_grad_kernel alike)
    c_bad = (c - c) != 0.0
    k2 = inv_T * LOG2E
    lza2 = lza * LOG2E
    lzb2 = lzb * LOG2E
    lzs2 = lzs * LOG2E
    div_l = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        live = mask & valid  # ignored rows read nothing and get zeros
        s = tl.load(s_row + cols, mask=live, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK], tl.float32)
        if SOFT:
            t = tl.load(t_row + cols, mask=live, other=0.0).to(tl.float32)
            logp = (t - ma) * inv_T - lza
            logq = (s - mb) * inv_T - lzb
            lp2 = log2_prob(t, ma, k2, lza2)
            lq2 = log2_prob(s, mb, k2, lzb2)
            p = tl.exp2(lp2)
            q = tl.exp2(lq2)
            if DIV == FORWARD_KL:
                grad_b = q - p
                if FUSED:
                    logp = (t - ma) * inv_T - lza
                    logq = (s - mb) * inv_T - lzb
                    div_l += tl.where(live & (p != 0), p * (logp - logq), 0.0)  # 0 log 0 = 0
            elif DIV == REVERSE_KL and FUSED:
                grad_b = tl.where(q == 0, 0.0, q * ((((s - cs) - (t - ct)) - c) * inv_T))
            else:
                _, qg = terms(DIV, LIN, logp, logq, lp2, lq2, p, q, param)
                grad_b = qg - tl.where(q == 0, 0.0, q * c)  # q·g may be nonzero at q = 0 (skew KL, α = 0)
            grad += soft_scale * grad_b
        if HARD:
            onehot = tl.where(cols == label, 1.0, 0.0)
            grad += hard_weight * (exp2_from(s, ms, LOG2E, lzs2) - onehot)
        if SOFT:
            grad = tl.where(c_bad, float("nan"), grad)
        grad = tl.where(valid, grad * gl, 0.0)
        tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)
    return tl.sum(div_l, 0)


@triton.jit
def kd_fwd_grad_kernel(s_ptr, t_ptr, lab_ptr, gs_ptr, loss_ptr, g_ptr,
                       V, s_L, s_sb, s_sl, t_L, t_sb, t_sl, g_sb, g_sl,
                       inv_T, param, soft_scale, grad_soft, hard_weight, ignore_index,
                       DIV: tl.constexpr, LIN: tl.constexpr, SOFT: tl.constexpr,
                       HAS_LABELS: tl.constexpr,
                       HARD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                       GBLOCK: tl.constexpr):
    """The training path of one row in one program: the forward of ``kd_fwd_kernel`` (pass 1,
    and pass 2 for the mixture divergences) gives the loss and the statistics, kept in registers,
    then the gradient pass of ``kd_bwd_kernel`` writes grad_scale[row] · d loss / d s
    (soft_scale = soft_weight·T² for the loss, grad_soft = soft_weight·T for the gradient;
    grad_scale = 1 without HAS_SCALE). Same code, same fp32 values: the gradient equals
    backward_rows' bitwise for grad_loss = grad_scale, and so does the loss, except for
    - forward KL, whose D is summed in the gradient pass from p and q (pass 1 then keeps no
      online KL: c = -1 needs no loss), where forward_rows accumulates it online in its one pass;
    - reverse KL, whose pass 1 is the grouped one with c = E_q[x] on the first-block centres
      (``first_block_centres``), which the gradient pass subtracts from the same x: exact where the
      two-kernel path's c = D and the gradient's log-ratios round apart (rows wider than BLOCK
      at |logits| ~ 1e4), and memory-bound (30.5 instead of 47.5 SASS/elem on sm_90, bf16, hard
      term: docs/gpu_model.md);
    all within the error bound. Bytes (bf16): 4 + 6 for forward / reverse KL, 4 + 4 + 6 for jsd,
    skew_kl, skew_reverse_kl, tvd (c needs A and B)."""
    row = tl.program_id(0).to(tl.int64)
    s_off, t_off, label, valid = row_setup(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                                            ignore_index, HAS_LABELS)
    g_off = (row // s_L) * g_sb + (row % s_L) * g_sl
    s_row = s_ptr + s_off
    t_row = t_ptr + t_off
    LATE: tl.constexpr = SOFT and DIV == FORWARD_KL  # D summed in the gradient pass
    cs, ct = first_block_centres(s_row, t_row, tl.where(valid, V, 0), SOFT and DIV == REVERSE_KL,
                                 BLOCK)
    total, ma, lza, mb, lzb, c, ms, lzs, cs, ct = _row_loss(
        s_row, t_row, label, valid, V, inv_T, param, soft_scale, hard_weight, cs, ct,
        DIV, LIN, SOFT, HARD, True, BLOCK)
    if HAS_SCALE:
        gl = tl.load(gs_ptr + row).to(tl.float32)
    else:
        gl = tl.full([], 1.0, tl.float32)
    # the values backward_rows would load from the stats tensor
    ma = tl.where(valid, ma, 0.0)
    lza = tl.where(valid, lza, 0.0)
    mb = tl.where(valid, mb, 0.0)
    lzb = tl.where(valid, lzb, 0.0)
    c = tl.where(valid, c, 0.0)
    ms = tl.where(valid, ms, 0.0)
    lzs = tl.where(valid, lzs, 0.0)
    div = _row_grad(s_row, t_row, g_ptr + g_off, label, valid, V, gl, ma, lza, mb, lzb, c, ms,
                    lzs, cs, ct, inv_T, param, grad_soft, hard_weight, DIV, LIN, SOFT, HARD, True,
                    GBLOCK)
    if LATE:
        total = total + soft_scale * div
    tl.store(loss_ptr + row, tl.where(valid, total, 0.0))


@triton.jit
def kd_rescale_kernel(g_ptr, gl_ptr, gs_ptr, V, g_sb, g_sl, L,
                      HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """In place: g[row] *= grad_loss[row] / grad_scale[row] (0 where grad_scale is 0: masked rows,
    whose gradient is 0), in fp32 rounded once. A row whose ratio is exactly 1 (the usual case:
    the fused gradient was computed for this grad_loss) reads and writes nothing."""
    row = tl.program_id(0).to(tl.int64)
    gl = tl.load(gl_ptr + row).to(tl.float32)
    if HAS_SCALE:
        gs = tl.load(gs_ptr + row).to(tl.float32)
    else:
        gs = tl.full([], 1.0, tl.float32)
    ratio = tl.where(gs != 0, gl / gs, 0.0)
    n = tl.where(ratio == 1.0, 0, V)
    g_row = g_ptr + (row // L) * g_sb + (row % L) * g_sl
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_row + cols, (g * ratio).to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def kd_given_stats_kernel(s_ptr, t_ptr, lab_ptr, stats_ptr, out_ptr,
                          V, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                          inv_T, param, ignore_index,
                          DIV: tl.constexpr, LIN: tl.constexpr, HAS_LABELS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Vocab-parallel pass 2: with the normalisers (mt, log za, ms, log zb) given in ``stats``
    (the layout kd_fwd_kernel stores; in the vocab-parallel loss they are the global ones), the
    sums over this row's V columns of φ and of q·g (the constant parts of g left out, as in
    kd_fwd_kernel's second pass) into out[row, 0], out[row, 1]; zeros on ignored rows."""
    row = tl.program_id(0).to(tl.int64)
    s_off, t_off, label, valid = row_setup(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                                            ignore_index, HAS_LABELS)
    s_row = s_ptr + s_off
    t_row = t_ptr + t_off
    n = tl.where(valid, V, 0)
    ninf = float("-inf")
    st = stats_ptr + row * STATS
    ma = tl.load(st + 0)
    lza = tl.load(st + 1)
    mb = tl.load(st + 2)
    lzb = tl.load(st + 3)
    k2 = inv_T * LOG2E
    lza2 = lza * LOG2E
    lzb2 = lzb * LOG2E
    div_l = tl.zeros([BLOCK], tl.float32)  # per-lane sums, one reduction after the loop
    c_l = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
        logp = (t - ma) * inv_T - lza
        logq = (s - mb) * inv_T - lzb
        lp2 = log2_prob(t, ma, k2, lza2)
        lq2 = log2_prob(s, mb, k2, lzb2)
        p = tl.exp2(lp2)
        q = tl.exp2(lq2)
        phi, qg = terms(DIV, LIN, logp, logq, lp2, lq2, p, q, param)
        div_l += phi
        c_l += qg
    div = tl.sum(div_l, 0)
    c = tl.sum(c_l, 0)
    tl.store(out_ptr + row * 2, tl.where(valid, div, 0.0))
    tl.store(out_ptr + row * 2 + 1, tl.where(valid, c, 0.0))
