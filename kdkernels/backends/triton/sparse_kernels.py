"""Triton kernels of the sparse (stored top-k teacher) loss: @triton.jit only, no torch.

One program per row (token). ``s`` is a [B, L, V] view with unit column stride; row r lives at
``(r // L) * stride_b + (r % L) * stride_l``. All offsets are int64. Statistics are fp32.

* ``sparse_stats_kernel``: the row's log-sum-exp of s/T (NEED_B) and of s (NEED_A) in one online
  pass over V-blocks, s[label] (NEED_A) and the K gathers s[idx_k] (idx −1 = unused slot).
* ``sparse_grad_dense_kernel``: grad_j = c_B · exp(s_j/T − lse_B) + c_A · exp(s_j − lse_A) for
  every column, stored in the gradient's dtype (c_B already holds the 1/T factor).
* ``sparse_grad_fixup_kernel``: launched after the dense kernel; rewrites the K gathered columns
  (and the label column) with dense value + sparse gradient, recomputed in fp32 so each element
  is rounded once. Duplicate indices in a row are not supported (the last store wins; the loss
  layer makes such a row's loss NaN).

Indices outside [0, V) other than −1 (unused slot) are masked in every gather and store: the
kernels never read or write outside the row, whatever the indices; such a slot's gathered value
is NaN, so the loss of its row is NaN (no host synchronisation is needed to detect it). Labels
outside [0, V) are masked the same way.
"""
import triton
import triton.language as tl


@triton.jit
def _row_base(s_ptr, stride_b, stride_l, L):
    row = tl.program_id(0).to(tl.int64)
    return row, s_ptr + (row // L) * stride_b + (row % L) * stride_l


@triton.jit
def sparse_stats_kernel(s_ptr, stride_b, stride_l, L, V, idx_ptr, K, lab_ptr, stats_ptr,
                        gath_ptr, inv_t, NEED_B: tl.constexpr, NEED_A: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row, base = _row_base(s_ptr, stride_b, stride_l, L)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        idx = tl.load(idx_ptr + row * K + ks, mask=kmask, other=-1)
        use = kmask & (idx >= 0) & (idx < V)  # never a read outside the row
        bad = kmask & ((idx < -1) | (idx >= V))  # out of range: NaN, not a read
        g = tl.load(base + tl.where(use, idx, 0), mask=use, other=0.0).to(tl.float32)
        g = tl.where(bad, float("nan"), g)
        tl.store(gath_ptr + row * K + ks, g, mask=kmask)

    lse_b = tl.zeros([], tl.float32)
    lse_a = tl.zeros([], tl.float32)
    s_lab = tl.zeros([], tl.float32)
    if NEED_B or NEED_A:
        m_b = tl.full([], float("-inf"), tl.float32)
        z_b = tl.zeros([], tl.float32)
        m_a = tl.full([], float("-inf"), tl.float32)
        z_a = tl.zeros([], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            if NEED_B:
                xb = x * inv_t
                m_new = tl.maximum(m_b, tl.max(xb, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                z_b = z_b * tl.exp(m_b - m_safe) + tl.sum(tl.exp(xb - m_safe), 0)
                m_b = m_new
            if NEED_A:
                m_new = tl.maximum(m_a, tl.max(x, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                z_a = z_a * tl.exp(m_a - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
                m_a = m_new
        if NEED_B:
            lse_b = m_b + tl.log(z_b)
        if NEED_A:
            lse_a = m_a + tl.log(z_a)
            lab = tl.load(lab_ptr + row)
            ok = (lab >= 0) & (lab < V)
            s_lab = tl.load(base + tl.where(ok, lab, 0)).to(tl.float32)
    tl.store(stats_ptr + row * 3, lse_b)
    tl.store(stats_ptr + row * 3 + 1, lse_a)
    tl.store(stats_ptr + row * 3 + 2, s_lab)


@triton.jit
def _dense_grad(x, c_b, lse_b, c_a, lse_a, inv_t, NEED_B: tl.constexpr, NEED_A: tl.constexpr):
    g = tl.zeros_like(x)
    if NEED_B:  # rows with a zero coefficient (ignored rows) stay exactly zero, even for NaN s
        g += tl.where(c_b != 0.0, c_b * tl.exp(x * inv_t - lse_b), 0.0)
    if NEED_A:
        g += tl.where(c_a != 0.0, c_a * tl.exp(x - lse_a), 0.0)
    return g


@triton.jit
def sparse_grad_dense_kernel(grad_ptr, s_ptr, stride_b, stride_l, L, V, stats_ptr, cb_ptr, ca_ptr,
                             inv_t, NEED_B: tl.constexpr, NEED_A: tl.constexpr,
                             BLOCK_V: tl.constexpr):
    row, base = _row_base(s_ptr, stride_b, stride_l, L)
    out = grad_ptr + row * V
    c_b = tl.load(cb_ptr + row)
    c_a = tl.load(ca_ptr + row)
    lse_b = tl.load(stats_ptr + row * 3)
    lse_a = tl.load(stats_ptr + row * 3 + 1)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        if NEED_B or NEED_A:
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = _dense_grad(x, c_b, lse_b, c_a, lse_a, inv_t, NEED_B, NEED_A)
        else:
            g = tl.zeros([BLOCK_V], tl.float32)
        tl.store(out + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sparse_grad_fixup_kernel(grad_ptr, s_ptr, stride_b, stride_l, L, V, stats_ptr, cb_ptr, ca_ptr,
                             idx_ptr, gidx_ptr, K, lab_ptr, glab_ptr, inv_t,
                             NEED_B: tl.constexpr, NEED_A: tl.constexpr, BLOCK_K: tl.constexpr):
    row, base = _row_base(s_ptr, stride_b, stride_l, L)
    out = grad_ptr + row * V
    c_b = tl.load(cb_ptr + row)
    c_a = tl.load(ca_ptr + row)
    lse_b = tl.load(stats_ptr + row * 3)
    lse_a = tl.load(stats_ptr + row * 3 + 1)
    lab = tl.load(lab_ptr + row)
    g_lab = tl.load(glab_ptr + row)
    lab_ok = (lab >= 0) & (lab < V)
    hits = tl.zeros([], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        idx = tl.load(idx_ptr + row * K + ks, mask=kmask, other=-1)
        use = kmask & (idx >= 0) & (idx < V)  # out-of-range slots are never read nor written
        safe = tl.where(use, idx, 0)
        x = tl.load(base + safe, mask=use, other=0.0).to(tl.float32)
        val = _dense_grad(x, c_b, lse_b, c_a, lse_a, inv_t, NEED_B, NEED_A)
        val += tl.load(gidx_ptr + row * K + ks, mask=use, other=0.0)
        if NEED_A:
            hit = use & (idx == lab)
            val += tl.where(hit, g_lab, 0.0)
            hits += tl.sum(hit.to(tl.int32), 0)
        tl.store(out + safe, val.to(grad_ptr.dtype.element_ty), mask=use)
    if NEED_A:  # the label column, when none of the K slots named it
        safe = tl.where(lab_ok, lab, 0)
        x = tl.load(base + safe).to(tl.float32)
        val = _dense_grad(x, c_b, lse_b, c_a, lse_a, inv_t, NEED_B, NEED_A) + g_lab
        tl.store(out + safe, val.to(grad_ptr.dtype.element_ty), mask=lab_ok & (hits == 0))
