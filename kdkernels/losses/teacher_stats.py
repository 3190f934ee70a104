"""Per-row statistics of a teacher's tempered distribution (for confidence token weights)."""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backends.reference import CHUNK_ELEMENTS
from ..checks import as_rows, check_float_tensor, check_number, compute_dtype

__all__ = ["teacher_stats", "TeacherStats"]


class TeacherStats(NamedTuple):
    """Per-row statistics of softmax(t / T): ``lse`` = logsumexp(t / T), ``entropy`` = −Σ p log p
    (nats), ``max_prob`` = max_i p_i. Each has the leading shape of the logits."""
    lse: Tensor
    entropy: Tensor
    max_prob: Tensor


# Columns per block of the online pass in teacher_stats.
STATS_BLOCK = 4096


@torch.no_grad()
def teacher_stats(teacher_logits: Tensor, temperature: float = 1.0,
                  vocab_size: Optional[int] = None) -> TeacherStats:
    """Log-sum-exp, entropy and maximum probability of each row of softmax(teacher_logits / T),
    in one pass over the vocabulary, for building teacher-confidence ``token_weights``.

    Rows are processed in chunks and each chunk in blocks of columns, merged online as
    (m, z, y) with z = Σ e^{a−m} and y = Σ e^{a−m}(a − m); so no [N, V] fp32 buffer exists, and
    entropy = log z − y / z and max_prob = 1 / z need no subtraction of large numbers.
    ``vocab_size`` uses only the first columns (a padded teacher vocabulary). −inf logits are
    legal (probability 0); a row that is entirely −inf gives lse −inf and NaN entropy/max_prob.
    Results are float32 (float64 for float64 logits) and carry no gradient.
    """
    check_float_tensor("teacher_logits", teacher_logits)
    T = check_number("temperature", temperature, positive=True)
    V = teacher_logits.shape[-1]
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) \
                or not 1 <= vocab_size <= V:
            raise ValueError(f"vocab_size must be an int in [1, {V}], got {vocab_size!r}")
        V = int(vocab_size)
    lead = teacher_logits.shape[:-1]
    t3 = as_rows(teacher_logits[..., :V], names=["teacher_logits"])
    B, L, _ = t3.shape
    cd = compute_dtype(teacher_logits.dtype)
    out = torch.empty((3, B, L), dtype=cd, device=teacher_logits.device)
    block = min(V, STATS_BLOCK)
    rows = max(1, CHUNK_ELEMENTS // block)
    for b in range(B):
        for l0 in range(0, L, rows):
            l1 = min(L, l0 + rows)
            m = torch.full((l1 - l0,), float("-inf"), dtype=cd, device=out.device)
            z = torch.zeros_like(m)
            y = torch.zeros_like(m)
            for v0 in range(0, V, block):
                a = t3[b, l0:l1, v0:v0 + block].to(cd) / T
                mb = a.amax(-1)
                m_new = torch.maximum(m, mb)
                safe = torch.where(m_new > float("-inf"), m_new, 0.0)  # all −inf so far
                x = a - safe.unsqueeze(-1)
                e = x.exp()
                zb = e.sum(-1)
                yb = torch.where(e > 0, e * x, 0.0).sum(-1)
                # rescale the old (m, z, y) to the new maximum: y' = e^{m−m'}(y + (m − m')z)
                r = (m - safe).exp()
                y = r * (y + torch.where(z > 0, (m - safe) * z, 0.0)) + yb
                z = r * z + zb
                m = m_new
            out[0, b, l0:l1] = m + z.log()
            out[1, b, l0:l1] = z.log() - y / z
            out[2, b, l0:l1] = 1.0 / z
    out = out.view(3, *lead)
    return TeacherStats(out[0], out[1], out[2])
