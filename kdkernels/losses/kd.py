"""``kd_loss`` and ``KDLoss``: the distillation loss on logits.

Checks the arguments (``kdkernels.checks``), views the logits as rows, runs the dense row op of
the chosen backend (``kdkernels.ops.dense``) or the reference, and reduces the rows
(``kdkernels.reduction``). See docs/ for the conventions and the math.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from .. import divergences as D
from ..backends import reference
from ..checks import (as_rows, check_float_tensor, check_labels, check_options,
                      check_teachers, check_token_weights, mask_zero_weights)
from ..distributed.vocab_parallel import check_vocab_parallel_args, vocab_parallel_rows
from ..ops.dense import kd_rows, kd_rows_with_grad
from ..ops.ensemble import drop_zero_weight_teachers, kd_rows_ensemble, kd_rows_ensemble_with_grad
from ..reduction import reduce_rows, row_grad

__all__ = ["kd_loss", "KDLoss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "forward_kl",
            temperature: float = 1.0, labels: Optional[Tensor] = None, ignore_index: int = -100,
            soft_weight: float = 1.0, hard_weight: float = 0.0, reduction: str = "batchmean",
            num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
            beta: Optional[float] = None, alpha: Optional[float] = None,
            backend: str = "auto", token_weights: Optional[Tensor] = None,
            teacher_weights=None, teacher_requires_grad: Optional[bool] = None,
            grad_inplace: bool = False, process_group=None,
            vocab_start_index: Optional[int] = None) -> Tensor:
    """Knowledge-distillation loss between teacher and student next-token distributions.

    Per row (token): ``soft_weight · T² · D(p, q) + hard_weight · CE(softmax(s), label)`` with
    p = softmax(teacher/T), q = softmax(student/T) and D the ``divergence`` (see
    ``kdkernels.divergences``). Rows whose label equals ``ignore_index`` count for nothing.

    Args:
        student_logits: [..., V] float tensor (fp32, bf16, fp16, or float64 for the reference).
            Row-strided views such as ``logits[:, :-1]`` are used without a copy.
        teacher_logits: [..., Vt] with Vt >= V and the same leading shape and dtype; columns past
            V (a padded vocabulary) are dropped without a copy. A list/tuple of M such tensors,
            or one [M, ..., Vt] tensor, is an ensemble (see ``teacher_weights``).
        divergence: "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd" or
            "logit_mse" ((1/2V) Σ (t̃ − s̃)² on row-centred logits; temperature does not apply).
        temperature: T > 0, divides both teacher and student logits.
        labels: optional [...] integer tensor; enables masking and the hard-label term.
        ignore_index: label value of rows that do not count.
        soft_weight, hard_weight: weights of T²·D and of the hard cross-entropy (at T = 1).
        reduction: "batchmean" (sum / counted rows, or / num_items_in_batch), "sum",
            "mean" (batchmean / V) or "none" (per-row values, leading shape).
        num_items_in_batch: global count of counted tokens used as the batchmean denominator
            (gradient accumulation, data parallelism).
        beta: JSD mixture weight of the teacher, in (0, 1) (default 0.5).
        alpha: skew for "skew_kl" / "skew_reverse_kl", in [0, 1) (default 0.1).
        backend: "auto", "reference", "triton", "cuda" or "cpu".
        token_weights: optional non-negative float tensor of the leading shape: multiplies each
            row's loss (and so its gradient); a zero weight equals masking the row. "batchmean"
            then divides by the sum of the weights of counted rows (unless num_items_in_batch).
        teacher_weights: M non-negative floats summing to 1 (default uniform) for an ensemble:
            p = Σ_m w_m softmax(t_m / T) (for "logit_mse" the teacher logits Σ_m w_m t_m).
        teacher_requires_grad: also return the gradient w.r.t. the teacher logits (online or
            mutual distillation). None: for each teacher that requires grad. False: teachers are
            constants. Every backend computes it (the kernels: with the exchanged divergence,
            ``divergences.exchanged``); with an ensemble only the reference does.
        grad_inplace: opt-in memory saving for callers that no longer need the student logits:
            backward writes the gradient into the student logits' own storage, so no [N, V]
            gradient buffer is allocated. The logits are DESTROYED (they hold their gradient
            after backward), and autograd raises if anything else saved them for its backward.
            Ignored by the reference backend (it always allocates its gradient).
        process_group: a ``torch.distributed`` tensor-parallel group over which the logits are
            sharded on the vocabulary: each rank passes its [..., V_local] shards (same rows on
            every rank) and gets the loss of the full vocabulary (``kdkernels.distributed``).
            ``labels`` are then global vocabulary ids, and the vocabulary checks are per shard.
            Runs on the kernels of ``backend`` ("auto": as without a group) on each rank's shard.
        vocab_start_index: with ``process_group``, the global id of this rank's first column;
            default: shards in rank order (offsets from the gathered shard sizes).

    Returns:
        A float32 tensor (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``. Zero counted rows give 0, never NaN.
    """
    check_float_tensor("student_logits", student_logits)
    teachers, tw = check_teachers(teacher_logits, student_logits, teacher_weights)
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if teacher_requires_grad is None:
        teacher_grad = any(t.requires_grad for t in teachers)
    elif isinstance(teacher_requires_grad, bool):
        teacher_grad = teacher_requires_grad
        if teacher_grad and not any(t.requires_grad for t in teachers):
            raise ValueError("teacher_requires_grad=True but no teacher_logits tensor requires grad")
    else:
        raise TypeError(f"teacher_requires_grad must be None or a bool, got "
                        f"{type(teacher_requires_grad).__name__}")
    if not teacher_grad:  # teachers of weight 0 take no part (one left: the single-teacher path)
        teachers, tw = drop_zero_weight_teachers(teachers, tw)
    opts = check_options(divergence, beta, alpha, temperature, soft_weight, hard_weight,
                         ignore_index, reduction, labels, num_items_in_batch)
    ii = opts.ignore_index
    if not isinstance(grad_inplace, bool):
        raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__}")
    check_vocab_parallel_args(process_group, vocab_start_index)
    # with a process group the label range is the global vocabulary, checked by the shards' loss
    flat_labels = check_labels(labels, lead, student_logits.device,
                               V if process_group is None else None, ii)
    flat_w = check_token_weights(token_weights, lead, student_logits.device)
    flat_labels = mask_zero_weights(flat_labels, flat_w, ii)
    feature = D.DIVERGENCES[divergence].feature
    needs = {feature} if feature else set()
    if tw is not None:
        needs.add("ensemble")
    if teacher_grad:
        needs.add("teacher_grad")

    # Teachers are constants unless their gradient is asked for.
    if not teacher_grad:
        teachers = [t.detach() for t in teachers]
    s3, *t3 = as_rows(student_logits, *[t[..., :V] for t in teachers],
                      names=["student_logits"] + [f"teacher_logits[{i}]" for i in range(len(teachers))])
    args = opts.scalars()
    if process_group is not None:
        if needs:
            raise ValueError(f"process_group does not support {sorted(needs)} (ensembles, teacher "
                             "gradients and logit_mse are single-process features for now)")
        # the backend's kernels on the local shard (or the reference's chunked PyTorch path)
        name = backends.choose(backend, student_logits.device, student_logits.dtype,
                               frozenset({"vocab_parallel"}), "kd_loss with process_group")
        rows, vocab_size = vocab_parallel_rows(s3, t3[0], flat_labels, process_group,
                                               vocab_start_index, *args, backend=name)
        return reduce_rows(rows, reduction, lead, vocab_size, flat_labels, ii, num_items_in_batch,
                           token_weights=flat_w)
    name = backends.choose(backend, student_logits.device, student_logits.dtype, frozenset(needs))
    reason = _reference_only(opts, tw, teacher_grad) if name != "reference" else None
    if reason:
        if backend != "auto":
            raise ValueError(f"backend={backend!r} does not support {reason}; use "
                             f"backend='reference' or backend='auto'")
        name = "reference"
    if name == "reference":
        rows = reference.loss_rows(s3, t3[0] if tw is None else t3, flat_labels, *args,
                                   teacher_weights=tw)
    elif tw is not None:  # an ensemble on a kernel backend (kdkernels.ops.ensemble)
        if torch.is_grad_enabled() and s3.requires_grad and backends.has(name, "fused_grad"):
            hint = _grad_hint(reduction, s3.shape[0] * s3.shape[1], V, flat_labels, ii,
                              num_items_in_batch, flat_w, s3.device)
            rows, _ = kd_rows_ensemble_with_grad(s3, t3, tw, flat_labels, name, *args, hint)
        else:
            rows, _ = kd_rows_ensemble(s3, t3, tw, flat_labels, name, *args)
    elif (not grad_inplace and not teacher_grad and torch.is_grad_enabled() and s3.requires_grad
          and backends.has(name, "fused_grad")):
        # loss and gradient in one kernel call, for the grad_loss reduce_rows will send back
        hint = _grad_hint(reduction, s3.shape[0] * s3.shape[1], V, flat_labels, ii,
                          num_items_in_batch, flat_w, s3.device)
        rows, _ = kd_rows_with_grad(s3, t3[0], flat_labels, name, *args, hint)
    else:
        rows, _ = kd_rows(s3, t3[0], flat_labels, name, *args, grad_inplace)
    return reduce_rows(rows, reduction, lead, V, flat_labels, ii, num_items_in_batch,
                       token_weights=flat_w)


def _reference_only(opts, teacher_weights, teacher_grad: bool) -> Optional[str]:
    """What in this call no kernel backend computes (None: the kernels can): combinations of the
    features, which the backends list one by one."""
    if teacher_weights is not None and teacher_grad:
        return "teacher gradients of an ensemble"
    if teacher_weights is not None and opts.div_id == D.LOGIT_MSE:
        return "logit_mse with an ensemble"
    if teacher_grad and opts.div_id == D.JSD and not 2.0 ** -24 <= opts.param <= 1.0 - 2.0 ** -126:
        # the teacher gradient runs jsd(1 - beta) (divergences.exchanged), not representable
        return f"teacher gradients of jsd with beta={opts.param!r} (1 - beta rounds to 1 in fp32)"
    return None


def _grad_hint(reduction: str, n_rows: int, V: int, flat_labels: Optional[Tensor],
               ignore_index: int, num_items_in_batch, flat_w: Optional[Tensor],
               device) -> Optional[Tensor]:
    """The grad_loss [N] (float32) reduce_rows sends back to the rows when the reduced loss has
    gradient 1 (``reduction.row_grad``: bitwise autograd's value); None (ones) for "none" or while
    compiling. Only a speed hint for the fused gradient: ops.dense.scale_rows rescales whenever
    the real grad_loss differs. A weight that is not finite, or 0 on a row that is not masked,
    becomes 1 (a masked row's gradient is 0 whatever its scale)."""
    if reduction == "none" or torch.compiler.is_compiling():
        return None
    g = row_grad(reduction, n_rows, V, flat_labels, ignore_index, num_items_in_batch, flat_w,
                 dtype=torch.float32, device=device)
    ok = g != 0 if flat_labels is None else (g != 0) | (flat_labels == ignore_index)
    return torch.where(torch.isfinite(g) & ok, g, 1.0).contiguous()


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: the options are fixed at construction and checked there.

    >>> crit = KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
    >>> loss = crit(student_logits, teacher_logits, labels)      # doctest: +SKIP
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 ignore_index: int = -100, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 reduction: str = "batchmean", beta: Optional[float] = None,
                 alpha: Optional[float] = None, backend: str = "auto", teacher_weights=None,
                 teacher_requires_grad: Optional[bool] = None, grad_inplace: bool = False,
                 process_group=None, vocab_start_index: Optional[int] = None):
        super().__init__()
        # fail early, at construction (labels arrive with each call)
        check_options(divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index,
                      reduction, need_labels_for_hard=False)
        self.divergence = divergence
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight
        self.reduction = reduction
        self.beta = beta
        self.alpha = alpha
        self.backend = backend
        self.teacher_weights = teacher_weights            # ensemble weights (checked per call)
        self.teacher_requires_grad = teacher_requires_grad
        if not isinstance(grad_inplace, bool):
            raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__}")
        self.grad_inplace = grad_inplace  # see kd_loss: backward overwrites the student logits
        # vocab-parallel (tensor-parallel) loss over this torch.distributed group, if given
        self.process_group = process_group
        self.vocab_start_index = vocab_start_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None, num_items_in_batch=None,
                token_weights: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, divergence=self.divergence,
                       temperature=self.temperature, labels=labels,
                       ignore_index=self.ignore_index, soft_weight=self.soft_weight,
                       hard_weight=self.hard_weight, reduction=self.reduction,
                       num_items_in_batch=num_items_in_batch, beta=self.beta, alpha=self.alpha,
                       backend=self.backend, token_weights=token_weights,
                       teacher_weights=self.teacher_weights,
                       teacher_requires_grad=self.teacher_requires_grad,
                       grad_inplace=self.grad_inplace, process_group=self.process_group,
                       vocab_start_index=self.vocab_start_index)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("beta", "alpha")
                        if getattr(self, k) is not None)
        return (f"divergence={self.divergence!r}, temperature={self.temperature}{extra}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
