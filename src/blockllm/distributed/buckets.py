"""Collectives over many tensors at once: one flat buffer per (device, dtype).

Collectives need a single dtype, and a few large ones beat many small ones. Both the optimizer
(its gradients) and the command line's data-parallel loop (its step scalars) go through here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), each group in the given order."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[(tensor.device, tensor.dtype)].append(tensor)
    return list(groups.values())


def all_reduce_mean_(tensors: list[torch.Tensor], group: Any, world_size: int) -> int:
    """Replace each tensor, in place, by its mean over ``group``; returns the payload bytes."""
    sent = 0
    for bucket in buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(world_size)
        sent += flat.numel() * flat.element_size()
        for tensor, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(averaged)
    return sent


def broadcast_(tensors: list[torch.Tensor], source_rank: int, group: Any) -> None:
    """Copy ``source_rank``'s values into every rank's ``tensors``."""
    for bucket in buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=source_rank, group=group)
        for tensor, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(value)


__all__ = ["all_reduce_mean_", "broadcast_", "buckets"]
