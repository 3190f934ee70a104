"""Drop-in recipes for training frameworks. Each submodule imports its framework only when used,
so none of them is needed to import ``kdkernels``; install the extras you use
(``pip install "kdkernels[hf]"``, ``[trl]``, ``[torchtune]``).

- ``kdkernels.integrations.huggingface``: ``KDTrainer`` (a ``transformers.Trainer`` that distils
  from a teacher model) and ``distillation_loss`` (the loss step, usable in any loop), on logits
  or, with ``fused_linear=True``, on hidden states and lm_head weights.
- ``kdkernels.integrations.trl``: ``generalized_jsd_loss``, the values of TRL ``GKDTrainer``'s
  static method for 0 < β < 1, and ``patch_gkd_trainer`` to install it.
- ``kdkernels.integrations.torchtune``: ``ForwardKLLoss`` and ``ForwardKLWithChunkedOutputLoss``,
  drop-ins for torchtune's knowledge-distillation losses.

See docs/integrations.md.
"""
__all__ = ["huggingface", "trl", "torchtune"]
