"""kdkernels: fused kernels for LLM knowledge-distillation losses.

Public API::

    import kdkernels as kd
    loss = kd.kd_loss(student_logits, teacher_logits, divergence="forward_kl", temperature=2.0)
    crit = kd.KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
"""
from . import divergences
from .backends import availability as backend_availability
from .features import FeatureLoss, feature_loss
from .functional import TeacherStats, kd_loss, teacher_stats
from .modules import KDLoss

__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "teacher_stats", "TeacherStats", "feature_loss", "FeatureLoss",
           "divergences", "backend_availability", "__version__"]
