"""kdkernels: fused kernels for LLM knowledge-distillation losses.

Public API::

    import kdkernels as kd
    loss = kd.kd_loss(student_logits, teacher_logits, divergence="forward_kl", temperature=2.0)
    crit = kd.KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
    loss = kd.fused_linear_kd_loss(h_s, lm_head_s.weight, h_t, lm_head_t.weight, labels=labels)

Layout (README "Layout"): ``divergences`` · ``checks`` · ``reduction`` · ``losses/`` · ``ops/`` ·
``backends/`` · ``distributed/`` · ``topk`` · ``integrations/`` · ``tools/``.
"""
from . import divergences
from .backends import availability as backend_availability
from .distributed import global_num_items
from .losses.features import FeatureLoss, feature_loss
from .losses.fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .losses.kd import KDLoss, kd_loss
from .losses.sparse import sparse_kd_loss
from .losses.teacher_stats import TeacherStats, teacher_stats
from .topk import dump_topk, load_topk

__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "sparse_kd_loss",
           "dump_topk", "load_topk", "global_num_items", "teacher_stats", "TeacherStats",
           "feature_loss", "FeatureLoss", "divergences", "backend_availability", "__version__"]
