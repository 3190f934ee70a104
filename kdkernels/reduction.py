"""Reductions of per-row losses: the one closed form every loss uses.

Every reduction is  reduced = (Σ_i w_i·rows_i) / denominator [/ V]  with per-row weights w (the
token weights, 0 on ignored rows; none at all without token weights and labels) and a
denominator known before any row is computed. ``reduce_rows`` evaluates it;
``row_grad`` gives d reduced / d rows_i in closed form, computed with the same operations autograd
applies to ``reduce_rows``, so the fused paths (``kd_loss`` on backends that form the gradient
in forward, ``fused_linear_kd_loss``) use bitwise the gradient autograd would send back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["reduce_rows", "row_grad"]


def _row_weights(n_rows: int, flat_labels: Optional[Tensor], ignore_index: int,
                 token_weights: Optional[Tensor], dtype, device) -> Optional[Tensor]:
    """w [n_rows]: the token weights (ones without) with 0 on ignored rows; None when there are
    neither token weights nor labels (every row counts once)."""
    if token_weights is None and flat_labels is None:
        return None
    w = (token_weights.to(dtype) if token_weights is not None
         else torch.ones(n_rows, dtype=dtype, device=device))
    if flat_labels is not None:
        w = torch.where(flat_labels != ignore_index, w, 0.0)
    return w


def _terms(rows_dtype, n_rows, flat_labels, ignore_index, num_items_in_batch, token_weights,
           device):
    """(w, denominator) of the closed form. The denominator is ``num_items_in_batch`` when given,
    else the sum of the counted token weights, else the number of counted rows; a tensor where it
    depends on values (no host synchronisation); 0 counted rows give 0 / 1 = 0."""
    w = _row_weights(n_rows, flat_labels, ignore_index, token_weights, rows_dtype, device)
    if num_items_in_batch is not None:
        denom = (num_items_in_batch.to(device=device, dtype=rows_dtype).reshape(())
                 if isinstance(num_items_in_batch, Tensor) else float(num_items_in_batch))
    elif token_weights is not None:
        wsum = w.sum()
        denom = torch.where(wsum > 0, wsum, 1.0)
    elif flat_labels is None:
        denom = float(max(n_rows, 1))
    else:
        denom = (flat_labels != ignore_index).sum().clamp_min(1).to(rows_dtype)
    return w, denom


def reduce_rows(rows: Tensor, reduction: str, lead_shape, V, flat_labels: Optional[Tensor],
                ignore_index: int, num_items_in_batch=None,
                token_weights: Optional[Tensor] = None) -> Tensor:
    """Reduce per-row losses (ignored rows already 0) as ``reduction`` says: "sum" Σ w·rows,
    "batchmean" that over the denominator, "mean" batchmean / V, "none" the weighted rows in the
    leading shape."""
    w, denom = _terms(rows.dtype, rows.numel(), flat_labels, ignore_index, num_items_in_batch,
                      token_weights, rows.device)
    weighted = rows if w is None else rows * w
    if reduction == "none":
        return (weighted if token_weights is not None else rows).view(lead_shape)
    total = weighted.sum()
    if reduction == "sum":
        return total
    out = total / denom
    return out / V if reduction == "mean" else out


def row_grad(reduction: str, n_rows: int, V, flat_labels: Optional[Tensor], ignore_index: int,
             num_items_in_batch=None, token_weights: Optional[Tensor] = None, *,
             dtype: torch.dtype = torch.float32, device=None) -> Optional[Tensor]:
    """d reduce_rows / d rows_i as an [n_rows] tensor (None for "none" without token weights:
    ones), formed by the operations autograd applies in reverse: 1 / V, / denominator, · w."""
    if token_weights is not None:
        device = token_weights.device
    elif flat_labels is not None:
        device = flat_labels.device
    w, denom = _terms(dtype, n_rows, flat_labels, ignore_index, num_items_in_batch, token_weights,
                      device)
    if reduction == "none":
        return None if token_weights is None else w
    g = torch.ones((), dtype=dtype, device=device)
    if reduction == "mean":
        g = g / V
    if reduction != "sum":
        g = g / denom
    return g.expand(n_rows) if w is None else g * w
