"""Hugging Face transformers: logit distillation from a teacher model with ``kdkernels``.

Two entry points:

- ``distillation_loss(model, teacher_model, inputs, ...)``: one loss step for a causal LM batch
  (``input_ids``, optional ``attention_mask``, ``labels`` with -100 on positions to skip, as for
  the model's own loss). Position i predicts token i + 1, so logits [:, :-1] meet labels [:, 1:].
  The teacher runs in eval mode without gradient. With ``fused_linear=True`` the models' final
  hidden states go with their lm_head weights to ``kdkernels.fused_linear_kd_loss``: the
  [tokens, V] logits of neither model are ever built.
- ``KDTrainer``: a ``transformers.Trainer`` whose ``compute_loss`` is ``distillation_loss``.

Gradient accumulation: the Trainer counts the target tokens of all micro-batches of an optimizer
step (``labels[..., 1:] != -100`` for causal LMs) and passes that ``num_items_in_batch`` to
``compute_loss``; the loss is then ``sum / num_items_in_batch`` for each micro-batch, so the
accumulated gradient equals the full-batch gradient, not a mean of per-micro-batch means.
The Trainer is told the loss is already scaled (``loss_is_scaled_for_ga``); when no count is
passed the loss is a per-micro-batch mean and the Trainer divides by the accumulation steps.

The fused path assumes logits = lm_head(last hidden state) (+ bias), optionally with Gemma-2
style ``final_logit_softcapping``; models that rescale logits otherwise (``logit_scale``) must use
the logits path.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["distillation_loss", "KDTrainer"]

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def _model_inputs(inputs):
    return {k: inputs[k] for k in _MODEL_KEYS if k in inputs and inputs[k] is not None}


def _hidden_and_head(model, inputs):
    """Final hidden states [B, L, H], lm_head weight and bias of a ``*ForCausalLM`` model."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to fuse with; "
                         "use fused_linear=False")
    out = model.base_model(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, getattr(head, "bias", None)


def _softcap(model) -> Optional[float]:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def distillation_loss(model, teacher_model, inputs, *, num_items_in_batch=None,
                      fused_linear: bool = False, divergence: str = "forward_kl",
                      temperature: float = 1.0, soft_weight: float = 1.0,
                      hard_weight: float = 0.0, beta=None, alpha=None, backend: str = "auto",
                      return_outputs: bool = False):
    """Distillation loss of ``model`` (student) against ``teacher_model`` on a causal LM batch.

    Returns the loss (and the student's outputs when ``return_outputs``: the model output on the
    logits path, a dict with ``hidden_states`` on the fused path). Positions whose shifted label is
    -100 do not count; ``num_items_in_batch`` (the global count of counted tokens) replaces the
    local count as the denominator. ``hard_weight`` adds the student's cross-entropy on the labels.
    """
    if "labels" not in inputs or inputs["labels"] is None:
        raise ValueError("inputs must contain 'labels' (use -100 on positions that do not count)")
    labels = inputs["labels"][:, 1:]
    model_inputs = _model_inputs(inputs)
    opts = dict(labels=labels, divergence=divergence, temperature=temperature,
                soft_weight=soft_weight, hard_weight=hard_weight, beta=beta, alpha=alpha,
                num_items_in_batch=num_items_in_batch, backend=backend, ignore_index=-100)
    was_training = teacher_model.training
    teacher_model.eval()
    try:
        if not fused_linear:
            outputs = model(**model_inputs)
            with torch.no_grad():
                t_logits = teacher_model(**model_inputs).logits
            from .. import kd_loss

            loss = kd_loss(outputs.logits[:, :-1], t_logits[:, :-1], **opts)
        else:
            from .. import fused_linear_kd_loss  # written alongside; imported only when used

            if _softcap(model) != _softcap(teacher_model):
                raise ValueError(f"student and teacher final_logit_softcapping differ "
                                 f"({_softcap(model)} vs {_softcap(teacher_model)}); "
                                 "use fused_linear=False")
            hs, ws, bs = _hidden_and_head(model, model_inputs)
            with torch.no_grad():
                ht, wt, bt = _hidden_and_head(teacher_model, model_inputs)
            H, Ht = hs.shape[-1], ht.shape[-1]
            opts["labels"] = labels.reshape(-1)
            loss = fused_linear_kd_loss(hs[:, :-1].reshape(-1, H), ws, ht[:, :-1].reshape(-1, Ht),
                                        wt, student_bias=bs, teacher_bias=bt,
                                        softcap=_softcap(model), **opts)
            outputs = {"hidden_states": hs}
    finally:
        teacher_model.train(was_training)
    return (loss, outputs) if return_outputs else loss


def __getattr__(name):
    # KDTrainer subclasses transformers.Trainer, so it is built on first access: importing this
    # module (or kdkernels) never needs transformers.
    if name == "KDTrainer":
        cls = _make_trainer_class()
        globals()["KDTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_trainer_class():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("KDTrainer needs transformers: pip install 'kdkernels[hf]'") from e

    class KDTrainer(transformers.Trainer):
        """``transformers.Trainer`` that distils ``model`` from ``teacher_model``.

        Keyword arguments past the Trainer's own: ``teacher_model`` (required), ``divergence``,
        ``temperature``, ``soft_weight``, ``hard_weight``, ``beta``, ``alpha``, ``fused_linear``,
        ``backend`` (as in ``kdkernels.kd_loss``). The teacher is moved to the student's device,
        put in eval mode and frozen.
        """

        def __init__(self, *args, teacher_model, divergence="forward_kl", temperature=1.0,
                     soft_weight=1.0, hard_weight=0.0, beta=None, alpha=None,
                     fused_linear=False, backend="auto", **kwargs):
            super().__init__(*args, **kwargs)
            from .. import divergences

            divergences.resolve_param(divergences.get(divergence), beta, alpha)  # fail early
            self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
            self.kd_options = dict(divergence=divergence, temperature=temperature,
                                   soft_weight=soft_weight, hard_weight=hard_weight, beta=beta,
                                   alpha=alpha, fused_linear=fused_linear, backend=backend)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = distillation_loss(model, self.teacher_model, inputs,
                                              num_items_in_batch=num_items_in_batch,
                                              return_outputs=True, **self.kd_options)
            # Tell training_step whether this loss already accounts for gradient accumulation.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices",
                                                          False):
                loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
            return (loss, outputs) if return_outputs else loss

    return KDTrainer
