"""TRL: a drop-in for ``GKDTrainer.generalized_jsd_loss`` computed by ``kdkernels.kd_loss``.

Same signature and the same values as TRL's static method for every β in [0, 1], without the
[B, L, V] float buffers TRL's formula materialises (log-softmaxes, the mixture, two ``kl_div``
maps). Conventions, mapped onto ``kd_loss``:

- JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q, p = softmax(teacher/T) and
  q = softmax(student/T): kdkernels' ``divergence="jsd"``, with the same β.
- TRL does not multiply by T²; ``kd_loss`` does, so this wrapper passes ``soft_weight = 1/T²``.
- Masking: labels equal to -100 are dropped (TRL hard-codes -100).
- ``reduction="batchmean"`` divides by the number of kept tokens when labels are given, and by
  ``student_logits.shape[0]`` (the batch size, not the token count) when they are not, as TRL does;
  ``"sum"`` sums; ``"mean"`` divides by kept tokens × V. With ``num_items_in_batch`` the sum is
  divided by it whatever the reduction. Zero kept tokens give 0 (TRL's ``"mean"`` gives NaN).
- ``reduction="none"``: TRL returns the elementwise [tokens, V] map, which is exactly the buffer
  this library avoids; it is refused (use ``kd_loss(..., reduction="none")`` for per-token values).
- β = 0 and β = 1 (the GKD paper's forward and reverse KL settings): TRL switches to the full KLs
  there (β = 0: KL(teacher‖student), ``F.kl_div(student_log_probs, teacher_log_probs)``;
  β = 1: KL(student‖teacher)), while the JSD itself tends to 0 at both ends: a discontinuity.
  This drop-in computes what TRL computes: ``divergence="forward_kl"`` at β = 0 and
  ``divergence="reverse_kl"`` at β = 1, with the same T, masking and reductions. (``kd_loss``
  itself refuses ``divergence="jsd"`` with β outside (0, 1) and names these two divergences.)
  β outside [0, 1] is an error.
- The result is float32 (float64 for float64 logits), computed in fp32 whatever the input dtype.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["generalized_jsd_loss", "patch_gkd_trainer"]

_REDUCTIONS = ("batchmean", "sum", "mean")


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (0 <= β <= 1) on kdkernels. See the module doc."""
    from .. import kd_loss

    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (TRL's interpolation coefficient), got {beta!r}")
    # TRL's special cases: beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher)
    if beta == 0.0:
        div = dict(divergence="forward_kl")
    elif beta == 1.0:
        div = dict(divergence="reverse_kl")
    else:
        div = dict(divergence="jsd", beta=beta)
    if reduction == "none":
        raise ValueError("reduction='none' (TRL's elementwise [tokens, V] map) is not supported: "
                         "it is the buffer kdkernels avoids; use kdkernels.kd_loss(..., "
                         "reduction='none') for per-token values")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    T = float(temperature)
    kw = dict(div, temperature=T, soft_weight=1.0 / (T * T), labels=labels, ignore_index=-100)
    if num_items_in_batch is not None:
        total = kd_loss(student_logits, teacher_logits, reduction="sum", **kw)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "batchmean" and labels is None:
        total = kd_loss(student_logits, teacher_logits, reduction="sum", **kw)
        return total / max(student_logits.shape[0], 1)
    return kd_loss(student_logits, teacher_logits, reduction=reduction, **kw)


def _gkd_trainer_class():
    try:
        from trl.experimental.gkd import GKDTrainer  # trl >= 0.2x moved it here
        return GKDTrainer
    except ImportError:
        pass
    try:
        from trl import GKDTrainer
        return GKDTrainer
    except ImportError as e:
        raise ImportError("TRL's GKDTrainer is not importable: pip install 'kdkernels[trl]'") from e


def patch_gkd_trainer(trainer_cls=None):
    """Replace ``trainer_cls.generalized_jsd_loss`` (default: TRL's ``GKDTrainer``) with this
    module's function; returns the previous static method so it can be restored."""
    cls = trainer_cls if trainer_cls is not None else _gkd_trainer_class()
    previous = cls.__dict__.get("generalized_jsd_loss")
    cls.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    return previous
