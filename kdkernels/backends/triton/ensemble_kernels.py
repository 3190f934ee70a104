"""Triton kernels for teacher ensembles: the target p = Σ_m w_m softmax(t_m / T). ``@triton.jit``
only; notation and per-element math as in ``kernels.py`` (whose helpers these kernels share).

Three kernels, one program per row each:
  ``lse_rows_kernel`` (launched once per teacher and once for the student, twice with the hard
    term at T != 1): the (max, log sum-exp) of one [B, L, V] view's rows at scale k, per-lane
    online state and one merge, written into two columns of the stats. Each input is read once.
  ``ens_fwd_kernel``: with every normaliser known, per block log p = log Σ_m w_m e^{log p_m}
    (accumulated teacher by teacher with a running maximum, so a row where every teacher equals
    the student gives log p = log q exactly when the weights sum to 1 in fp32), then φ and q·g as
    for one teacher: the loss and c. Forward and reverse KL take this pass too (p has no online
    form). Reads s and every teacher once more.
  ``ens_bwd_kernel``: the same log p per block, then the single teacher's gradient.

Stats [N, 7 + 2(M - 1)] fp32: columns 0..6 as ``kd_fwd_kernel`` stores them (teacher 0's raw max
and log sum-exp in 0, 1), then teacher m's in 7 + 2(m - 1), 8 + 2(m - 1), m = 1..M-1. Teachers
arrive as tuples of pointers, row splits and strides (any row strides, unit column stride);
``M`` is a compile-time constant (the teacher loop is unrolled).
"""
import triton
import triton.language as tl

from .kernels import FORWARD_KL, LOG2E, STATS, row_setup, safe_max, terms


@triton.jit
def lse_rows_kernel(x_ptr, lab_ptr, stats_ptr, W, col, V, x_L, x_sb, x_sl, k2, ignore_index,
                    HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr):
    """stats[row, col] = max of the row (raw units, -inf as 0), stats[row, col + 1] =
    log Σ 2^{(x - max)·k2}; zeros on ignored rows (which read nothing)."""
    row = tl.program_id(0).to(tl.int64)
    off, _unused, label, valid = row_setup(lab_ptr, row, x_L, x_sb, x_sl, x_L, x_sb, x_sl,
                                     ignore_index, HAS_LABELS)
    x_row = x_ptr + off
    n = tl.where(valid, V, 0)
    ninf = float("-inf")
    mx = tl.full([BLOCK], ninf, tl.float32)
    z = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=ninf).to(tl.float32)
        up = x > mx
        e = tl.where(x == ninf, 0.0, tl.exp2(tl.abs(x - mx) * -k2))  # |x|·(-k2): one FMUL
        z = tl.where(up, z * e + 1.0, z + e)
        mx = tl.where(up, x, mx)
    m_r = tl.max(mx, 0)
    z_r = tl.sum(z * tl.exp2((mx - safe_max(m_r)) * k2), 0)
    st = stats_ptr + row * W + col
    tl.store(st, tl.where(valid, safe_max(m_r), 0.0))
    tl.store(st + 1, tl.where(valid, tl.log(z_r), 0.0))


@triton.jit
def _ens_logp(t_ptrs, t_Ls, t_sbs, t_sls, w_ptr, st, row, cols, live, inv_T,
              M: tl.constexpr, BLOCK: tl.constexpr):
    """log p = log Σ_m w_m p_m of one block of columns, with a running maximum of the log p_m
    (per teacher: raw max and log sum-exp from the stats row ``st``)."""
    ninf = float("-inf")
    hi = tl.full([BLOCK], ninf, tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for m in tl.static_range(M):
        if m == 0:
            mt = tl.load(st + 0)
            lz = tl.load(st + 1)
        else:
            mt = tl.load(st + 7 + 2 * (m - 1))
            lz = tl.load(st + 8 + 2 * (m - 1))
        t_off = (row // t_Ls[m]) * t_sbs[m] + (row % t_Ls[m]) * t_sls[m]
        t = tl.load(t_ptrs[m] + t_off + cols, mask=live, other=ninf).to(tl.float32)
        lpm = (t - mt) * inv_T - lz
        hn = tl.maximum(hi, lpm)
        hs = safe_max(hn)
        acc = acc * tl.exp(hi - hs) + tl.load(w_ptr + m) * tl.exp(lpm - hs)
        hi = hn
    return hi + tl.log(acc)


@triton.jit
def ens_fwd_kernel(s_ptr, t_ptrs, t_Ls, t_sbs, t_sls, w_ptr, lab_ptr, loss_ptr, stats_ptr,
                   V, s_L, s_sb, s_sl, inv_T, param, soft_scale, hard_weight, ignore_index,
                   M: tl.constexpr, DIV: tl.constexpr, LIN: tl.constexpr,
                   SOFT: tl.constexpr,
                   HAS_LABELS: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row loss soft_scale·D(p, q) + hard_weight·CE (0 on ignored rows) and c into the stats,
    whose normalisers ``lse_rows_kernel`` wrote (soft_scale = soft_weight·T²)."""
    row = tl.program_id(0).to(tl.int64)
    s_off, _unused, label, valid = row_setup(lab_ptr, row, s_L, s_sb, s_sl, s_L, s_sb, s_sl,
                                       ignore_index, HAS_LABELS)
    s_row = s_ptr + s_off
    n = tl.where(valid, V, 0)
    st = stats_ptr + row * (STATS + 2 * (M - 1))
    div = tl.zeros([], tl.float32)
    c = tl.zeros([], tl.float32)
    if SOFT:
        mb = tl.load(st + 2)
        lzb = tl.load(st + 3)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            logp = _ens_logp(t_ptrs, t_Ls, t_sbs, t_sls, w_ptr, st, row, cols, mask, inv_T,
                             M, BLOCK)
            logq = (s - mb) * inv_T - lzb
            phi, qg = terms(DIV, LIN, logp, logq, logp * LOG2E, logq * LOG2E, tl.exp(logp),
                            tl.exp(logq), param)
            div += tl.sum(phi, 0)
            c += tl.sum(qg, 0)
        if DIV == FORWARD_KL:
            c = tl.zeros([], tl.float32) - 1.0
    total = soft_scale * div
    if HARD:
        ms = tl.load(st + 5)
        lzs = tl.load(st + 6)
        in_range = (label >= 0) & (label < V)
        s_lab = tl.load(s_row + tl.where(in_range & valid, label, 0), mask=in_range & valid,
                        other=0.0).to(tl.float32)
        total += hard_weight * tl.where(in_range, (ms - s_lab) + lzs, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, total, 0.0))
    tl.store(st + 4, tl.where(valid, c, 0.0))


@triton.jit
def ens_bwd_kernel(s_ptr, t_ptrs, t_Ls, t_sbs, t_sls, w_ptr, lab_ptr, stats_ptr, gl_ptr, g_ptr,
                   V, s_L, s_sb, s_sl, g_sb, g_sl, inv_T, param, soft_scale, hard_weight,
                   ignore_index, M: tl.constexpr, DIV: tl.constexpr, LIN: tl.constexpr,
                   SOFT: tl.constexpr,
                   HAS_LABELS: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row] = grad_loss[row]·(soft_scale·q (g - c) + hard_weight·(softmax(s) - onehot)),
    soft_scale = soft_weight·T, as ``kd_bwd_kernel`` with the ensemble's log p; zeros on ignored
    rows; the +inf-loss rule (an infinite c: the row is NaN)."""
    row = tl.program_id(0).to(tl.int64)
    s_off, _unused, label, valid = row_setup(lab_ptr, row, s_L, s_sb, s_sl, s_L, s_sb, s_sl,
                                       ignore_index, HAS_LABELS)
    s_row = s_ptr + s_off
    g_row = g_ptr + (row // s_L) * g_sb + (row % s_L) * g_sl
    gl = tl.load(gl_ptr + row).to(tl.float32)
    st = stats_ptr + row * (STATS + 2 * (M - 1))
    mb = tl.load(st + 2)
    lzb = tl.load(st + 3)
    c = tl.load(st + 4)
    c_bad = (c - c) != 0.0
    ms = tl.load(st + 5)
    lzs = tl.load(st + 6)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        live = mask & valid
        s = tl.load(s_row + cols, mask=live, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK], tl.float32)
        if SOFT:
            logp = _ens_logp(t_ptrs, t_Ls, t_sbs, t_sls, w_ptr, st, row, cols, live, inv_T,
                             M, BLOCK)
            logq = (s - mb) * inv_T - lzb
            p = tl.exp(logp)
            q = tl.exp(logq)
            if DIV == FORWARD_KL:
                grad_b = q - p
            else:
                _, qg = terms(DIV, LIN, logp, logq, logp * LOG2E, logq * LOG2E, p, q, param)
                grad_b = qg - tl.where(q == 0, 0.0, q * c)
            grad += soft_scale * grad_b
        if HARD:
            onehot = tl.where(cols == label, 1.0, 0.0)
            grad += hard_weight * (tl.exp((s - ms) - lzs) - onehot)
        if SOFT:
            grad = tl.where(c_bad, float("nan"), grad)
        grad = tl.where(valid, grad * gl, 0.0)
        tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=mask)
