"""The op layer: ``torch.library`` custom ops (schema, fake kernel, autograd) over the backends.

``dense`` (kd_loss rows), ``sparse`` (the student side of sparse_kd_loss), ``fused_linear`` (the
chunked lm_head loop). Each op calls the backend module that ``kdkernels.backends`` names; none
holds math of its own."""
