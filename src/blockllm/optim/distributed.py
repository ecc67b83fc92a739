"""Data parallelism for BlockLLM without DDP's reducer.

DDP decides which tensors to all-reduce when it is built, so tensors frozen at that moment are
never synchronised once BlockLLM selects them. BlockLLM therefore averages gradients itself, and
only the ones it is about to use: the selected tensors (the selected coordinates of a partly
selected one) on an ordinary step, every candidate on a selection step (so that scores, and with
them the selection, are the same on every rank). Communication per ordinary step is about
``k`` values instead of ``N``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradientAverager:
    """Averages tensors over a process group, a few flat collectives at a time.

    Args:
        group: the ``torch.distributed`` process group (``dist.group.WORLD`` for all ranks).
    """

    def __init__(self, group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "BlockLLM(process_group=...) needs torch.distributed to be initialized first "
                "(torch.distributed.init_process_group, or launch with torchrun)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.source_rank = dist.get_global_rank(group, 0) if group is not None else 0
        self.bytes_communicated = 0

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its mean over the group."""
        if self.world_size == 1 or not tensors:
            return
        for bucket in _buckets(tensors):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
            self.bytes_communicated += flat.numel() * flat.element_size()
            for tensor, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                tensor.copy_(averaged)

    def average_scalar(self, value: float, device: torch.device) -> float:
        if self.world_size == 1:
            return value
        scalar = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(scalar, group=self.group)
        return float(scalar.item()) / self.world_size

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors (identical replicas from the start)."""
        if self.world_size == 1 or not tensors:
            return
        for bucket in _buckets(tensors):
            flat = _flatten_dense_tensors(bucket)
            dist.broadcast(flat, src=self.source_rank, group=self.group)
            for tensor, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                tensor.copy_(value)


def check_not_ddp_wrapped(names: list[str], process_group: Any) -> None:
    """Refuse the parameters of a ``DistributedDataParallel`` model when nothing else syncs them.

    DDP registers the tensors that are trainable when it is built and reduces only those; a
    tensor BlockLLM selects later is never averaged, and the replicas drift apart silently. The
    parameters of a DDP model are named ``module.*``; under a multi-rank process group with no
    ``process_group`` given to BlockLLM, that is the unsafe combination.
    """
    if process_group is not None or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() < 2 or not all(name.startswith("module.") for name in names):
        return
    raise ValueError(
        "Invalid params: they look like a DistributedDataParallel model's (every name starts "
        "with 'module.') and process_group is None. DDP only averages the tensors that were "
        "trainable when it was built, so blocks BlockLLM selects later would silently drift "
        "apart across ranks. Build BlockLLM on the unwrapped model without DDP and pass "
        "process_group=torch.distributed.group.WORLD: it then averages exactly the selected "
        "gradients (far fewer bytes than DDP)."
    )


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    # One flat buffer per (device, dtype): collectives need a single dtype, and few large
    # collectives beat many small ones.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[(tensor.device, tensor.dtype)].append(tensor)
    return list(groups.values())
