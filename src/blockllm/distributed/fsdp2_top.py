"""Top-|G| coordinates of tensors sharded over ranks, without gathering them.

One process picks a partly selected tensor's coordinates with ``topk`` on its whole gradient.
Under FSDP2 each rank holds a dim-0 shard of that gradient, and gathering it would put a full
copy of the largest tensors (often the embedding) on every rank, the memory spike FSDP exists to
avoid. Instead the ranks agree on a threshold: the exact ``count``-th largest magnitude, found by
bisection over the bit patterns of float32 magnitudes (for non-negative floats, the integer order
of the bits is the numeric order), 31 rounds of one scalar all-reduce each. Every rank then keeps
the entries above the threshold in its shard, and the ties at the threshold are handed out in
rank order until exactly ``count`` coordinates are chosen. The chosen set is the one ``topk``
would choose on the full tensor, up to ties. Whole-row selection (``partial="rows"``) runs the
same threshold over row norms: FSDP2 shards by rows, so each row's norm is local.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from blockllm.selection.coordinates import RowCoordinates, Selected, compact_index
from blockllm.selection.packing import (
    BudgetPacker,
    Coordinates,
    PaperMaskPacker,
    Plan,
    WholeTensorPacker,
)
from blockllm.selection.scorers import row_norms

# Bit patterns of non-negative float32 values (NaN included) lie in [0, 2**31).
_BITS_END = 1 << 31


def _all_reduce_sum(values: list[int], group: Any, device: torch.device) -> list[int]:
    # On the shards' device: an NCCL group reduces CUDA tensors only.
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def global_top_masks(
    magnitudes: Sequence[torch.Tensor], count: int, group: Any
) -> list[torch.Tensor]:
    """Boolean masks over the local ``magnitudes`` that mark the ``count`` largest of all ranks.

    Args:
        magnitudes: this rank's non-negative 1-D float32 tensors (the shards of one or more
            tensors, in the same order on every rank).
        count: how many entries to mark over all ranks together.
        group: the process group of the ranks that share the tensors.
    """
    if count <= 0:  # the same on every rank, so no rank waits for the others
        return [torch.zeros_like(magnitude, dtype=torch.bool) for magnitude in magnitudes]
    bits = [magnitude.view(torch.int32) for magnitude in magnitudes]
    device = magnitudes[0].device

    def count_at_least(threshold: int) -> int:
        local = sum(int(torch.count_nonzero(b >= threshold)) for b in bits)
        return _all_reduce_sum([local], group, device)[0]

    # Invariant: at least `count` entries are >= low, fewer than `count` are >= high.
    low, high = 0, _BITS_END
    while high - low > 1:
        middle = (low + high) // 2
        if count_at_least(middle) >= count:
            low = middle
        else:
            high = middle
    masks = [b > low for b in bits]
    ties = [b == low for b in bits]
    local_above = sum(int(mask.sum()) for mask in masks)
    local_ties = sum(int(tie.sum()) for tie in ties)
    above = _all_reduce_sum([local_above], group, device)[0]
    need = max(0, count - above)
    # Hand the `need` tied entries out in rank order: this rank takes what earlier ranks leave.
    gathered = [
        torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(
        gathered, torch.tensor([local_ties], dtype=torch.int64, device=device), group=group
    )
    before = sum(int(t.item()) for t in gathered[: dist.get_rank(group)])
    take = min(max(0, need - before), local_ties)
    for mask, tie in zip(masks, ties):
        if take <= 0:
            break
        tied = tie.nonzero().squeeze(1)[:take]
        mask[tied] = True
        take -= tied.numel()
    return masks


class CountRecorder(Protocol):
    group: Any

    def remember_count(self, coordinates: torch.Tensor, count: int) -> None: ...


def sharded_top_rows(
    flat: torch.Tensor, count: int, row_size: int, total_rows: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`blockllm.selection.packing.top_rows` over dim-0 shards: masks over local rows and
    over ``flat`` (the leftover coordinates).

    FSDP2 shards along dim 0, so every row lies whole on one rank and its norm is local; only
    the choice among rows (and of the few leftover coordinates) needs the global threshold.
    """
    local_rows = flat.numel() // row_size
    rows_wanted = min(count // row_size, total_rows)
    by_row = flat.reshape(local_rows, row_size)
    # As one process: low-precision rows reduced in fp32, fp32/fp64 ones in their own dtype;
    # the threshold search then needs the (small) norm vector in fp32.
    norms = row_norms(by_row).float()
    row_mask = global_top_masks([norms], rows_wanted, group)[0]
    extra = count - rows_wanted * row_size
    extra_mask = torch.zeros_like(flat, dtype=torch.bool)
    if extra > 0:
        # Chosen rows are marked -1, below every magnitude, so the extra ones come from outside.
        magnitude = by_row.abs().float().masked_fill(row_mask.unsqueeze(1), -1.0).reshape(-1)
        extra_mask = global_top_masks([magnitude], extra, group)[0]
    return row_mask, extra_mask


class ShardedPacker:
    """Wraps a packer for sharded gradients: same plan, coordinates chosen across ranks.

    The plan needs nothing new, because the scores it ranks are already global. Only
    :meth:`coordinates`, which looks into gradients, differs: it returns flat indices local to
    this rank's shard (possibly none), following the wrapped packer's rule:

    * :class:`WholeTensorPacker`: each partly selected tensor on its own, its ``count``
      coordinates as whole rows by row norm (``row_sizes``) or as its largest-|G| entries;
    * :class:`PaperMaskPacker`: one threshold over all partly selected tensors together; a
      tensor all of whose coordinates pass comes back whole (``None``), as in one process.

    Which tensors are selected is the same on every rank; only the local coordinate lists differ.

    Args:
        inner: the single-process packer (its ``plan`` is used as it is).
        sizes: global number of entries of each candidate.
        sync: the group to agree over, and where to record each tensor's global count.
    """

    def __init__(self, inner: BudgetPacker, sizes: Sequence[int], sync: CountRecorder) -> None:
        if not isinstance(inner, (WholeTensorPacker, PaperMaskPacker)):
            raise TypeError(f"no sharded coordinate rule for {type(inner).__name__}")
        self.inner = inner
        self.sizes = list(sizes)
        self.sync = sync

    def plan(self, scores: dict[int, float]) -> Plan:
        return self.inner.plan(scores)

    def coordinates(self, plan: Plan, grads: dict[int, torch.Tensor]) -> Coordinates:
        chosen: Coordinates = {index: None for index in plan.whole}
        if isinstance(self.inner, PaperMaskPacker):
            masks = self._joint_masks(plan, grads)
        else:
            masks = self._per_tensor_masks(plan, grads)
        if not masks:
            return chosen
        totals = _all_reduce_sum(
            [_count(mask) for mask in masks.values()], self.sync.group, self.sync.device
        )
        for (index, mask), total in zip(masks.items(), totals):
            if total == self.sizes[index]:
                chosen[index] = None
            elif total > 0:
                coordinates = _to_coordinates(mask)
                self.sync.remember_count(coordinates, total)
                chosen[index] = coordinates
        return chosen

    def _per_tensor_masks(self, plan: Plan, grads: dict[int, torch.Tensor]) -> dict[int, Any]:
        inner = self.inner
        counts = plan.counts or (plan.remainder,) * len(plan.partial)
        masks: dict[int, torch.Tensor] = {}
        for index, count in zip(plan.partial, counts):
            grad = grads.get(index)
            if grad is None or count <= 0:
                continue
            flat = _local(grad).detach().reshape(-1)
            row_size = inner.row_sizes[index] if inner.row_sizes is not None else 1
            if row_size > 1:
                total_rows = self.sizes[index] // row_size
                rows, extra = sharded_top_rows(flat, count, row_size, total_rows, self.sync.group)
                masks[index] = (rows, extra, row_size)
            else:
                magnitude = flat.abs().float()
                masks[index] = global_top_masks([magnitude], count, self.sync.group)[0]
        return masks

    def _joint_masks(self, plan: Plan, grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        present = [index for index in plan.partial if grads.get(index) is not None]
        if not present or plan.remainder <= 0:
            return {}
        magnitudes = [_local(grads[index]).detach().reshape(-1).abs().float() for index in present]
        count = min(plan.remainder, sum(self.sizes[index] for index in present))
        return dict(zip(present, global_top_masks(magnitudes, count, self.sync.group)))


def _count(mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor, int]) -> int:
    """Coordinates a mask (or a ``(row mask, leftover mask, row size)`` triple) marks."""
    if isinstance(mask, tuple):
        rows, extra, row_size = mask
        return int(rows.sum()) * row_size + int(extra.sum())
    return int(mask.sum())


def _to_coordinates(mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor, int]) -> Selected:
    """This rank's coordinates: rows as row ids (as one process stores them), else flat."""
    if isinstance(mask, tuple):
        rows, extra, row_size = mask
        return RowCoordinates(
            compact_index(rows.nonzero().squeeze(1), rows.numel()),
            compact_index(extra.nonzero().squeeze(1), extra.numel()),
            row_size,
        )
    return compact_index(mask.nonzero().squeeze(1), mask.numel())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
