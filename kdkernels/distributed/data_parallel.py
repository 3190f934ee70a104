"""Data-parallel helper: the global token count for the batchmean denominator."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["global_num_items", "check_group"]


def check_group(process_group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")


def global_num_items(labels: Tensor, ignore_index: int = -100, group=None) -> Tensor:
    """Number of counted tokens (labels != ignore_index) summed over the data-parallel ``group``.

    Returns an int64 tensor on the labels' device (one all_reduce, no host synchronisation). Pass
    it as ``num_items_in_batch`` so that each rank's loss is its share of the loss of the global
    batch: the per-rank losses then sum to the loss of one big batch, and so do the gradients.
    Without an initialised process group (and ``group=None``) it returns the local count.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    count = (labels != ignore_index).sum().to(torch.int64)
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return count
    if group is not None:
        check_group(group)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count
