"""Reductions of per-row losses: the one closed form every loss uses.

For every reduction but "none" the reduced loss is a weighted sum Σ_i w_i·rows_i whose weights are
known before any row is computed (``row_weights``). ``reduce_rows`` applies them; the fused
paths (``kd_loss`` on backends that form the gradient in forward, ``fused_linear_kd_loss``) use
the same weights as the per-row gradient scale, so the gradient they produce in forward is
bitwise the one autograd would send back through ``reduce_rows``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["row_weights", "reduce_rows"]


def row_weights(reduction: str, n_rows: int, V: int, flat_labels: Optional[Tensor],
                ignore_index: int, num_items_in_batch=None, token_weights: Optional[Tensor] = None,
                *, dtype: torch.dtype = torch.float32, device=None) -> Optional[Tensor]:
    """w [n_rows] with reduced loss = Σ w_i·rows_i, as a tensor (no host synchronisation).

    - "sum": w = token weight (1 without), 0 on ignored rows;
    - "batchmean": the same divided by ``num_items_in_batch`` when given, else by the sum of the
      counted token weights, else by the number of counted rows (0 counted rows: 0 / 1 = 0);
    - "mean": "batchmean" / V;
    - "none": the token weights (0 on ignored rows), or None when there are none.
    """
    if token_weights is not None:
        device = token_weights.device
        w = token_weights.to(dtype)
    else:
        w = torch.ones(n_rows, dtype=dtype, device=device)
    if flat_labels is not None:
        w = torch.where(flat_labels != ignore_index, w, 0.0)
    if reduction == "none":
        return w if token_weights is not None else None
    if reduction == "sum":
        return w
    if num_items_in_batch is not None:
        denom = (num_items_in_batch.to(device=w.device, dtype=dtype).reshape(())
                 if isinstance(num_items_in_batch, Tensor) else float(num_items_in_batch))
    else:
        wsum = w.sum()
        denom = torch.where(wsum > 0, wsum, 1.0)
    w = w / denom
    return w / V if reduction == "mean" else w


def reduce_rows(rows: Tensor, reduction: str, lead_shape, V: int, flat_labels: Optional[Tensor],
                ignore_index: int, num_items_in_batch=None,
                token_weights: Optional[Tensor] = None) -> Tensor:
    """Reduce per-row losses (ignored rows already 0) as ``reduction`` says: Σ w_i·rows_i with
    the weights of ``row_weights``, or the weighted rows in the leading shape for "none"."""
    w = row_weights(reduction, rows.numel(), V, flat_labels, ignore_index, num_items_in_batch,
                    token_weights, dtype=rows.dtype, device=rows.device)
    if reduction == "none":
        return (rows if w is None else rows * w).view(lead_shape)
    return (rows * w).sum()
