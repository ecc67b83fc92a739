"""Data parallelism for BlockLLM without DDP's reducer (``BlockLLM(process_group=...)``).

DDP decides which tensors to all-reduce when it is built, so tensors frozen at that moment are
never synchronised once BlockLLM selects them. BlockLLM therefore averages gradients itself, and
only the ones it is about to use: the selected tensors (the selected coordinates of a partly
selected one) on an ordinary step, every candidate on a selection step (so that scores, and with
them the selection, are the same on every rank). Communication per ordinary step is about
``k`` values instead of ``N``.

Each gradient is averaged exactly once: :meth:`ProcessGroupSync.touched` marks a candidate whose
gradient received a local contribution (a backward, a row-gradient deposit), and
:meth:`ProcessGroupSync.average_grads_` averages only marked ones, whoever asks first (the scoring
pass as a gradient lands, ``clip_grad_norm_``, or ``step()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from blockllm.distributed.base import local_grad_norm
from blockllm.distributed.buckets import all_reduce_mean_, broadcast_
from blockllm.selection.packing import BudgetPacker, Coordinates
from blockllm.selection.rest_rules import Shards


class ProcessGroupSync:
    """Averages over a process group, a few flat collectives at a time.

    Args:
        group: the ``torch.distributed`` process group (``dist.group.WORLD`` for all ranks).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
    """

    syncs_gradients = True
    shards_parameters = False

    def __init__(self, group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "BlockLLM(process_group=...) needs torch.distributed to be initialized first "
                "(torch.distributed.init_process_group, or launch with torchrun)"
            )
        self.process_group = group
        self.world_size = dist.get_world_size(group)
        self.source_rank = dist.get_global_rank(group, 0) if group is not None else 0
        self.bytes_communicated = 0
        # Candidates whose gradient holds a local contribution nobody has averaged yet.
        self._pending: set[int] = set()

    def local(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor

    def shards(self, param: torch.Tensor) -> Shards | None:
        return None  # every replica holds the whole averaged gradient

    def sum_over_shards_(self, tensor: torch.Tensor) -> None:
        pass  # replicas: each one's measure is already the whole tensor's

    def grad_norm(self, grad: torch.Tensor) -> float:
        return local_grad_norm(grad)  # averaged before it is scored, so the same on every rank

    def touched(self, index: int) -> None:
        self._pending.add(index)

    def average_grads_(self, grads: list[tuple[int, torch.Tensor]]) -> None:
        # Averaging a gradient that holds an averaged part plus a later micro-batch's local part
        # is still right: the averaged part is the same on every rank, so its mean is itself.
        todo = [grad for index, grad in grads if index in self._pending]
        self._pending.difference_update(index for index, _ in grads)
        self.average_(todo)

    def forget_grads(self) -> None:
        self._pending.clear()

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its mean over the group."""
        if self.world_size == 1 or not tensors:
            return
        self.bytes_communicated += all_reduce_mean_(tensors, self.process_group, self.world_size)

    def average_loss(self, value: float, device: torch.device) -> float:
        if self.world_size == 1:
            return value
        scalar = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(scalar, group=self.process_group)
        return float(scalar.item()) / self.world_size

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors (identical replicas from the start)."""
        if self.world_size == 1 or not tensors:
            return
        broadcast_(tensors, self.source_rank, self.process_group)

    def all_true(self, flag: bool) -> bool:
        return flag  # the gradients are averaged, so every rank reaches the same verdict

    def packer(self, inner: BudgetPacker, params: Sequence[torch.Tensor]) -> BudgetPacker:
        return inner

    def staying(self, old: Coordinates, new: Coordinates) -> set[int] | None:
        return None

    def count(self, coordinates: torch.Tensor) -> int:
        return coordinates.numel()


def check_not_ddp_wrapped(names: Sequence[str], process_group: Any) -> None:
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


def check_not_fsdp1_wrapped(names: Sequence[str]) -> None:
    """Refuse the parameters of an FSDP1 (``FullyShardedDataParallel``) model.

    FSDP1 flattens each wrapped unit into one ``_flat_param`` (several layers in one tensor, each
    rank holding a different slice of it), or with ``use_orig_params=True`` exposes views of those
    slices. Every rank would score and select from its own slice: the ranks would pick different
    blocks and drift apart silently. FSDP2 (``fully_shard``) keeps one DTensor per parameter,
    which BlockLLM selects from consistently.
    """
    wrapped = [
        name for name in names
        if "_fsdp_wrapped_module" in name.split(".") or name.split(".")[-1] == "_flat_param"
    ]  # fmt: skip
    if wrapped:
        raise ValueError(
            f"Invalid params: {wrapped[0]!r} is an FSDP1 (FullyShardedDataParallel) parameter. "
            "FSDP1 flattens layers into per-rank slices, so each rank would select different "
            "blocks and the replicas would drift apart. Shard the model with FSDP2 "
            "(torch.distributed.fsdp.fully_shard) instead and build BlockLLM on it "
            "(docs/distributed.md)."
        )


__all__ = ["ProcessGroupSync", "check_not_ddp_wrapped", "check_not_fsdp1_wrapped"]
