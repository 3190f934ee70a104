"""Distributed losses over ``torch.distributed``: ``vocab_parallel`` (logits sharded by
vocabulary, tensor parallelism), ``fused_linear`` (the lm_head sharded the same way) and
``data_parallel`` (the global token count). See docs/distributed.md."""
from .data_parallel import global_num_items

__all__ = ["global_num_items"]
