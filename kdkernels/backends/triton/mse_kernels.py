"""Triton kernels of ``logit_mse`` (divergence id 6). ``@triton.jit`` only; launched by
``mse_launch.py``.

Per row, with d = t − s on the kept columns (teacher and student not both −inf), n their count,
μ = mean of d over them and c = d − μ (the difference of the row-centred logits):

    loss = soft_weight · Σ c² / (2n) + hard_weight · CE(softmax(s), label)      (no T, no T²)
    ∂loss/∂s_j = −soft_weight · c_j / n (0 on the columns left out) + hard_weight · (softmax(s)_j − [j = label])

One program per row, walking its vocabulary in blocks of ``BLOCK`` columns; per-lane fp32
accumulators across blocks, one tree sum (``tl.sum``) at the end.

Forward (``kd_mse_fwd_kernel``): pass 1 sums d and counts the kept columns (and takes the hard
term's online (max, sum-exp) of s, as ``kernels.kd_fwd_kernel`` does); pass 2 sums c². −inf in
only one of t, s makes μ infinite or NaN: the loss is NaN and pass 2 is skipped. Stats per row
(fp32): (μ, n, −μ, n, 0, max s, log Σ e^{s − max s}) — columns 5, 6 the hard term's, exactly as
``kd_fwd_kernel`` stores them (0 and −inf when the hard term is off); zeros on ignored rows.
Backward (``kd_mse_bwd_kernel``) reads μ (column 0), n (column 1) and columns 5, 6 only, so the
row with columns (0, 1) and (2, 3) swapped and teacher and student exchanged gives the gradient
with respect to the teacher. An infinite or NaN μ makes the whole gradient row NaN (the +inf-loss
gradient rule, docs/precision.md). It may write into the student's own storage (``g_ptr`` ==
``s_ptr``): every element is read before the same program overwrites it.
"""
import triton
import triton.language as tl

from .. import STATS_WIDTH

STATS = tl.constexpr(STATS_WIDTH)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mse_row(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl, ignore_index,
             HAS_LABELS: tl.constexpr):
    """int64 offsets of the row in the student and teacher views, its label and whether it
    counts (as ``kernels._row_setup``)."""
    s_off = (row // s_L) * s_sb + (row % s_L) * s_sl
    t_off = (row // t_L) * t_sb + (row % t_L) * t_sl
    if HAS_LABELS:
        label = tl.load(lab_ptr + row)
        valid = label != ignore_index
    else:
        label = tl.full([], -1, tl.int64)
        valid = row >= 0
    return s_off, t_off, label, valid


@triton.jit
def kd_mse_fwd_kernel(s_ptr, t_ptr, lab_ptr, loss_ptr, stats_ptr,
                      V, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                      soft_weight, hard_weight, ignore_index,
                      SOFT: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per-row logit_mse loss (0 on ignored rows, which read no logits) and stats."""
    row = tl.program_id(0).to(tl.int64)
    s_off, t_off, label, valid = _mse_row(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                                          ignore_index, HAS_LABELS)
    s_row = s_ptr + s_off
    t_row = t_ptr + t_off
    n_cols = tl.where(valid, V, 0)
    ninf = float("-inf")
    zero = tl.zeros([], tl.float32)
    sum_d = tl.zeros([BLOCK], tl.float32)  # per lane: Σ d over its columns
    kept = tl.zeros([BLOCK], tl.int32)
    ms = tl.full([BLOCK], ninf, tl.float32)  # per lane: online (max, sum-exp) of s (hard term)
    zs = tl.zeros([BLOCK], tl.float32)
    s_lab = zero
    if HARD:
        lab_ok = (label >= 0) & (label < V) & valid
        s_lab = tl.load(s_row + tl.where(lab_ok, label, 0), mask=lab_ok, other=0.0).to(tl.float32)

    # ---- pass 1: Σ d, n (and the hard term's statistics) ----
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
        if SOFT:
            t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
            keep = (t != ninf) | (s != ninf)  # lanes past V load -inf in both: left out
            sum_d += tl.where(keep, t - s, 0.0)
            kept += keep.to(tl.int32)
        if HARD:
            up_s = s > ms
            es = tl.where(s == ninf, 0.0, tl.exp2(tl.abs(s - ms) * -LOG2E))
            zs = tl.where(up_s, zs * es + 1.0, zs + es)
            ms = tl.where(up_s, s, ms)

    total = zero
    mu = zero
    n = zero
    if SOFT:
        n = tl.sum(kept, 0).to(tl.float32)
        nd = tl.maximum(n, 1.0)  # an all -inf row: n = 0, loss 0
        mu = tl.sum(sum_d, 0) / nd
        finite = (mu - mu) == 0.0
        # ---- pass 2: Σ c² (skipped when μ is not finite: the loss is NaN) ----
        sum_c2 = tl.zeros([BLOCK], tl.float32)
        for start in range(0, tl.where(finite, n_cols, 0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=ninf).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=ninf).to(tl.float32)
            keep = (t != ninf) | (s != ninf)
            c = tl.where(keep, (t - s) - mu, 0.0)
            sum_c2 += c * c
        mse = tl.where(finite, tl.sum(sum_c2, 0) / (2.0 * nd), float("nan"))
        total = soft_weight * mse
    if HARD:
        ms_r = tl.max(ms, 0)
        ms_safe = tl.where(ms_r == ninf, 0.0, ms_r)
        zs_r = tl.sum(zs * tl.exp2((ms - ms_safe) * LOG2E), 0)
    else:
        ms_safe = zero
        zs_r = zero
    lzs = tl.log(zs_r)
    if HARD:
        in_range = (label >= 0) & (label < V)
        total += hard_weight * tl.where(in_range, (ms_safe - s_lab) + lzs, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, total, 0.0))
    st = stats_ptr + row * STATS
    tl.store(st + 0, tl.where(valid, mu, 0.0))
    tl.store(st + 1, tl.where(valid, n, 0.0))
    tl.store(st + 2, tl.where(valid, -mu, 0.0))
    tl.store(st + 3, tl.where(valid, n, 0.0))
    tl.store(st + 4, zero)
    tl.store(st + 5, tl.where(valid, ms_safe, 0.0))
    tl.store(st + 6, tl.where(valid, lzs, 0.0))


@triton.jit
def kd_mse_bwd_kernel(s_ptr, t_ptr, lab_ptr, stats_ptr, gl_ptr, g_ptr,
                      V, s_L, s_sb, s_sl, t_L, t_sb, t_sl, g_sb, g_sl,
                      soft_weight, hard_weight, ignore_index,
                      SOFT: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """grad[row] = grad_loss[row] · (−soft_weight · c / n + hard_weight · (softmax(s) − onehot));
    exact zeros on ignored rows. ``g_ptr`` may alias ``s_ptr``."""
    row = tl.program_id(0).to(tl.int64)
    s_off, t_off, label, valid = _mse_row(lab_ptr, row, s_L, s_sb, s_sl, t_L, t_sb, t_sl,
                                          ignore_index, HAS_LABELS)
    g_off = (row // s_L) * g_sb + (row % s_L) * g_sl
    s_row = s_ptr + s_off
    t_row = t_ptr + t_off
    g_row = g_ptr + g_off
    ninf = float("-inf")
    gl = tl.load(gl_ptr + row).to(tl.float32)
    st = stats_ptr + row * STATS
    mu = tl.load(st + 0)  # columns 0, 1 (and 5, 6) only: see the module docstring
    n = tl.load(st + 1)
    ms = tl.load(st + 5)
    lzs = tl.load(st + 6)
    bad = (mu - mu) != 0.0  # -inf in one model only (or NaN): a NaN row
    k_soft = soft_weight / tl.maximum(n, 1.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        live = mask & valid  # ignored rows read nothing and get zeros
        s = tl.load(s_row + cols, mask=live, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK], tl.float32)
        if SOFT:
            t = tl.load(t_row + cols, mask=live, other=0.0).to(tl.float32)
            keep = (t != ninf) | (s != ninf)
            grad -= k_soft * tl.where(keep, (t - s) - mu, 0.0)
        if HARD:
            onehot = tl.where(cols == label, 1.0, 0.0)
            grad += hard_weight * (tl.exp((s - ms) - lzs) - onehot)
        if SOFT:
            grad = tl.where(bad, float("nan"), grad)
        grad = tl.where(valid, grad * gl, 0.0)
        tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=mask)
