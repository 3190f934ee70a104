"""``fused_linear_kd_loss`` and ``FusedLinearKDLoss``: the loss from hidden states and lm_head
weights, logits never held in full (the chunk loop is ``kdkernels.ops.fused_linear``).

Because every reduction except "none" is a weighted sum of the rows with weights known in
advance (``kdkernels.reduction.row_grad``), forward produces the gradients of the reduced loss
and backward only scales them by the incoming scalar gradient. With ``reduction="none"`` forward
computes only the rows, and backward recomputes the logits chunk by chunk with the incoming
per-row gradients. Vocab-parallel: ``kdkernels.distributed.fused_linear``. See
docs/fused_linear.md.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from ..checks import (check_int, check_labels, check_linear, check_number, check_options,
                      check_same_rows, compute_dtype)
from ..distributed.fused_linear import VocabParallelFusedKD
from ..distributed.vocab_parallel import check_vocab_parallel_args, shard_start
from ..ops.fused_linear import LinearConfig, fused_linear_kd, fused_linear_kd_rows
from ..reduction import row_grad

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss", "auto_chunk_size"]

# Backend resolution imports modules and probes the machine: under torch.compile it runs once at
# trace time and its answer (a str) is a constant of the graph.
_choose_backend = torch.compiler.assume_constant_result(backends.choose)

# Default chunk size: bytes of ONE fp32 [chunk, V] buffer, per device type. A chunk holds a few
# such buffers at its peak (teacher and student logits, the logits-gradient, the backend's
# temporaries; about a dozen for the autograd-based reference backend). On CPU, 16 MiB keeps
# every buffer under glibc's mmap threshold (32 MiB), so chunk buffers are reused from the heap
# instead of being freshly mapped and first-touched for every chunk.
CHUNK_BUFFER_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}
# Never fewer rows than this per chunk (when N has them), so the GEMMs stay efficient.
MIN_CHUNK_ROWS = {"cuda": 1024, "cpu": 128}


def auto_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: as many as keep one fp32 [chunk, V] buffer within CHUNK_BUFFER_BYTES, at
    least the per-device minimum that keeps the GEMMs efficient, at most ``n_rows``."""
    kind = device.type if device.type in CHUNK_BUFFER_BYTES else "cpu"
    rows = CHUNK_BUFFER_BYTES[kind] // (4 * max(vocab, 1))
    rows = max(rows, MIN_CHUNK_ROWS[kind])
    return max(1, min(rows, n_rows))


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                         teacher_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                         divergence: str = "forward_kl", temperature: float = 1.0,
                         ignore_index: int = -100, soft_weight: float = 1.0,
                         hard_weight: float = 0.0, reduction: str = "batchmean",
                         num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
                         beta: Optional[float] = None, alpha: Optional[float] = None,
                         backend: str = "auto", softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None,
                         grad_weight_dtype: Optional[torch.dtype] = torch.float32,
                         process_group=None, vocab_start_index: Optional[int] = None) -> Tensor:
    """``kd_loss(student_hidden @ student_weightᵀ + student_bias, teacher_hidden @ teacher_weightᵀ
    + teacher_bias, ...)`` without ever holding the [N, V] logits: tokens are processed in chunks
    and the gradients w.r.t. the student hidden states, weight and bias are formed chunk by chunk.

    Args:
        student_hidden: [..., Ds] float tensor (fp32, bf16, fp16; float64 with the reference).
        student_weight: [V, Ds], same dtype and device; student_bias: optional [V].
        teacher_hidden: [..., Dt] with the same leading shape; teacher_weight: [Vt, Dt] with
            Vt >= V (only its first V rows are used: a padded teacher vocabulary costs nothing);
            teacher_bias: optional [Vt]. The teacher gets no gradient; its logits are cast to the
            student's dtype.
        labels, divergence, temperature, ignore_index, soft_weight, hard_weight, reduction,
        num_items_in_batch, beta, alpha, backend: as in ``kdkernels.kd_loss``.
        softcap: cap > 0 applies cap·tanh(z/cap) to student and teacher logits (after the bias),
            as Gemma 2 does; the gradient flows through the student side.
        chunk_size: rows per chunk; default ``auto_chunk_size`` (one fp32 [chunk, V] buffer
            within CHUNK_BUFFER_BYTES, at least MIN_CHUNK_ROWS rows).
        grad_weight_dtype: dtype in which the weight and bias gradients accumulate across chunks:
            torch.float32 (default) or None / the weight's dtype to save memory.
        process_group: a ``torch.distributed`` tensor-parallel group over which the lm_heads are
            sharded by vocabulary: ``student_weight`` (and bias) is this rank's [V_local, Ds]
            shard, ``teacher_weight`` (and bias) the [>= V_local, Dt] shard starting at the same
            vocabulary id; the hidden states and labels (global ids) are the same on every rank.
            Returns the full-vocabulary loss on every rank; the weight and bias gradients are
            those of the local shard, the hidden gradient is the full one (summed over the
            group). Each chunk runs on the kernels of ``backend`` on the local shard (the
            vocab-parallel rows of ``kd_loss``). See docs/distributed.md.
        vocab_start_index: with ``process_group``, the global id of this rank's first row of
            ``student_weight``; None: shards in rank order (needed only with the hard term).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or the leading shape for "none".
    """
    check_linear("student", student_hidden, student_weight, student_bias)
    check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    check_same_rows("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)
    lead = student_hidden.shape[:-1]
    V = student_weight.shape[0]
    if teacher_weight.shape[0] < V:
        raise ValueError(f"teacher_weight vocabulary ({teacher_weight.shape[0]}) is smaller than "
                         f"student_weight vocabulary ({V}); the teacher may only be wider (padded)")
    opts = check_options(divergence, beta, alpha, temperature, soft_weight, hard_weight,
                         ignore_index, reduction, labels, num_items_in_batch)
    ii = opts.ignore_index
    cap = 0.0 if softcap is None else check_number("softcap", softcap, positive=True)
    if grad_weight_dtype is None:
        grad_weight_dtype = student_weight.dtype
    if grad_weight_dtype not in (torch.float32, student_weight.dtype):
        raise ValueError(f"grad_weight_dtype must be torch.float32 or the weight dtype "
                         f"({student_weight.dtype}), got {grad_weight_dtype}")
    check_vocab_parallel_args(process_group, vocab_start_index)
    N = math.prod(lead)
    if chunk_size is None:
        chunk = auto_chunk_size(N, V, student_hidden.device)
    else:
        chunk = check_int("chunk_size", chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # with a process group the label range is the global vocabulary, checked by the shards' loss
    flat_labels = check_labels(labels, lead, student_hidden.device,
                               V if process_group is None else None, ii)
    name = _choose_backend(backend, student_hidden.device, student_hidden.dtype,
                           frozenset({"vocab_parallel"}) if process_group is not None
                           else frozenset())

    hs = student_hidden.reshape(N, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(N, teacher_hidden.shape[-1])
    wt = teacher_weight.detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    cfg = LinearConfig(cap, chunk, grad_weight_dtype == torch.float32)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hs.requires_grad, grad_on and student_weight.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad)
    cd = compute_dtype(student_hidden.dtype)
    dev = student_hidden.device

    if process_group is not None:
        start = vocab_start_index
        if opts.hard_weight != 0.0 and start is None:  # once per call, not per chunk
            start = shard_start(V, process_group, dev)
        # "mean" divides by the GLOBAL vocabulary, known after the first collective
        scale = row_grad("batchmean" if reduction == "mean" else reduction, N, V, flat_labels,
                            ii, num_items_in_batch, dtype=cd, device=dev)
        out = VocabParallelFusedKD.apply(hs, student_weight, student_bias, ht, wt, bt, flat_labels,
                                         scale, process_group, start, reduction == "none",
                                         reduction == "mean", opts, cfg, need, name)
        return out.view(lead) if reduction == "none" else out

    scalars = (name, *opts.scalars(), cap, chunk, cfg.weight_grad_fp32)
    if reduction == "none" or not any(need):
        rows = fused_linear_kd_rows(hs, student_weight, student_bias, ht, wt, bt, flat_labels,
                                    *scalars)
        if reduction == "none":
            return rows.view(lead)
        scale = row_grad(reduction, N, V, flat_labels, ii, num_items_in_batch,
                            dtype=rows.dtype, device=rows.device)
        return (rows * scale).sum()
    scale = row_grad(reduction, N, V, flat_labels, ii, num_items_in_batch, dtype=cd, device=dev)
    loss, *_ = fused_linear_kd(hs, student_weight, student_bias, ht, wt, bt, flat_labels, scale,
                               *scalars, *need)
    return loss


class FusedLinearKDLoss(torch.nn.Module):
    """``fused_linear_kd_loss`` as a module; options fixed (and checked) at construction.

    >>> crit = FusedLinearKDLoss(divergence="forward_kl", temperature=2.0)
    >>> loss = crit(h_s, lm_head_s.weight, h_t, lm_head_t.weight, labels)   # doctest: +SKIP
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 ignore_index: int = -100, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 reduction: str = "batchmean", beta: Optional[float] = None,
                 alpha: Optional[float] = None, backend: str = "auto",
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 grad_weight_dtype: Optional[torch.dtype] = torch.float32,
                 process_group=None, vocab_start_index: Optional[int] = None):
        super().__init__()
        check_options(divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index,
                      reduction, need_labels_for_hard=False)
        self.options = dict(divergence=divergence, temperature=temperature,
                            ignore_index=ignore_index, soft_weight=soft_weight,
                            hard_weight=hard_weight, reduction=reduction, beta=beta, alpha=alpha,
                            backend=backend, softcap=softcap, chunk_size=chunk_size,
                            grad_weight_dtype=grad_weight_dtype, process_group=process_group,
                            vocab_start_index=vocab_start_index)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, student_bias=student_bias,
                                    teacher_bias=teacher_bias, labels=labels,
                                    num_items_in_batch=num_items_in_batch, **self.options)
