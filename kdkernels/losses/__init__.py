"""The public losses: ``kd`` (kd_loss, KDLoss), ``fused_linear``, ``sparse`` (offline top-k
teachers), ``features`` (hidden-state matching), ``teacher_stats``."""
