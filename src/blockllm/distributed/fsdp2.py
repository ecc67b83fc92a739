"""BlockLLM on FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters sharded as DTensors.

Under FSDP2 every parameter is a ``DTensor`` whose local part is a dim-0 chunk of the full tensor,
and FSDP itself reduce-scatters (averages) the gradients before BlockLLM's hooks see them. So,
unlike ``process_group=`` data parallelism, BlockLLM averages no gradient here. What it must add
is agreement: each rank sees only its shard, yet every rank has to toggle ``requires_grad`` on
the same tensors (FSDP's collectives hang or silently misalign otherwise) and make the same
decisions. :class:`FSDP2Sync` holds the few collectives that buy that agreement:

* a tensor's score is the norm of its *full* gradient: the shards' sums of squares, all-reduced;
* the coordinates of a partly selected tensor come from one global threshold over row norms or
  magnitudes (:mod:`blockllm.distributed.fsdp2_top`); each rank keeps those inside its shard, as
  flat indices *local to that shard*, so the update gathers and scatters on local tensors only;
* whether a partly selected tensor keeps its moments across a reselection (its coordinates did
  not change) is decided on all ranks together;
* the loss that drives the trigger and the "all gradients finite" flag are reduced;
* the factored rest rule's column statistics, the mean of its row statistics and its clip's sum
  of squares are summed over the ranks (one all-reduce per tensor, :class:`Shards`); its row
  statistics stay with the rows, on their rank.

The update itself runs on ``to_local()`` views: moments, masters and coordinate lists are plain
local tensors, so optimizer memory is divided by the number of ranks like FSDP's own.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from blockllm.distributed.base import local_grad_norm
from blockllm.distributed.fsdp2_top import ShardedPacker
from blockllm.selection.coordinates import same as same_coordinates
from blockllm.selection.packing import BudgetPacker, Coordinates
from blockllm.selection.rest_rules import Shards

logger = logging.getLogger(__name__)


def local_view(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (a view: writes land in the parameter); others unchanged."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


class FSDP2Sync:
    """Agreement across the ranks of the 1-D device mesh the candidate DTensors live on.

    Build it with :meth:`detect`. Every method that communicates must be called by all ranks in
    the same order; BlockLLM only calls them from ``step()`` and from gradient hooks, which FSDP
    runs in the same order on every rank. FSDP averages the gradients itself, so the gradient
    methods of :class:`~blockllm.distributed.base.Communicator` do nothing here.
    """

    # BlockLLM averages no gradient under FSDP2 and has no process group of its own.
    process_group = None
    syncs_gradients = False
    shards_parameters = True
    bytes_communicated = 0

    def __init__(self, mesh: Any, device: torch.device) -> None:
        self.mesh = mesh
        # Where the scalars of collectives live: the shards' device (an NCCL group reduces CUDA
        # tensors only; gloo takes CPU ones).
        self.device = device
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        # The mesh coordinate decides which dim-0 chunk this rank holds.
        self.coordinate = mesh.get_local_rank()
        # Global number of selected coordinates of each partly selected tensor, keyed by the id of
        # the local coordinate tensor (checked through a weak reference, since ids are reused).
        # It makes ``num_selected`` the same global number on every rank without communicating.
        self._counts: dict[int, tuple[weakref.ReferenceType[torch.Tensor], int]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def detect(
        cls, names: Sequence[str], params: Sequence[torch.Tensor], process_group: Any
    ) -> FSDP2Sync | None:
        """A :class:`FSDP2Sync` when the candidates are FSDP2 DTensors; None when none is.

        Raises:
            ValueError: some candidates are DTensors and others are not, they are not placed the
                way ``fully_shard`` places them (``Shard(0)`` on one 1-D mesh), or a
                ``process_group`` is given as well (FSDP already reduces the gradients).
        """
        flags = [isinstance(param, DTensor) for param in params]
        if not any(flags):
            return None
        if not all(flags):
            plain = names[flags.index(False)]
            sharded = names[flags.index(True)]
            raise ValueError(
                f"Invalid params: some are DTensors (FSDP2), e.g. {sharded!r}, and some are not, "
                f"e.g. {plain!r}. Apply fully_shard to the root module too, so that every "
                "parameter is sharded, or exclude the plain ones."
            )
        if process_group is not None:
            raise ValueError(
                "Invalid process_group: the parameters are FSDP2 DTensors, whose gradients "
                "fully_shard already reduce-scatters; averaging them again is wrong. Pass "
                "process_group=None: BlockLLM then communicates over the parameters' device mesh."
            )
        mesh = params[0].device_mesh
        for name, param in zip(names, params):
            if param.device_mesh != mesh:
                raise ValueError(
                    f"Invalid params: {name!r} lives on a different device mesh than "
                    f"{names[0]!r}; BlockLLM needs all candidates on one mesh"
                )
            if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
                raise ValueError(
                    f"Invalid params: {name!r} is placed as {tuple(param.placements)} on a "
                    f"{mesh.ndim}-D mesh; BlockLLM supports FSDP2's default layout, Shard(0) on "
                    "a 1-D mesh (no HSDP, tensor parallelism or shard_placement_fn)"
                )
        logger.info("BlockLLM: FSDP2 parameters, %d ranks on the device mesh", mesh.size())
        return cls(mesh, local_view(params[0]).device)

    # ------------------------------------------------------------------ geometry

    def shard_range(self, param: torch.Tensor) -> tuple[int, int]:
        """Flat ``[start, stop)`` of this rank's shard inside the full (row-major) tensor.

        FSDP2 splits dim 0 the way ``torch.chunk`` does: chunks of ``ceil(rows / ranks)`` rows,
        so the last ranks may hold fewer rows, or none. A dim-0 chunk is one contiguous flat range.
        """
        local = local_view(param)
        rows = param.shape[0] if param.dim() > 0 else 1
        chunk = math.ceil(rows / self.world_size)
        first_row = min(self.coordinate * chunk, rows)
        expected_rows = max(0, min(chunk, rows - first_row))
        if local.dim() > 0 and local.shape[0] != expected_rows:
            raise RuntimeError(
                f"unexpected FSDP2 shard: {expected_rows} rows of {rows} expected on mesh "
                f"coordinate {self.coordinate}, found {local.shape[0]}"
            )
        row_numel = param.numel() // rows if rows else 0
        start = first_row * row_numel
        return start, start + local.numel()

    def packer(self, inner: BudgetPacker, params: Sequence[torch.Tensor]) -> ShardedPacker:
        """``inner``'s plan, with the coordinates of partly selected tensors chosen across ranks."""
        return ShardedPacker(inner, [param.numel() for param in params], self)

    # ------------------------------------------------------------------ gradients (FSDP's job)

    def local(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return local_view(tensor)

    def shards(self, param: torch.Tensor) -> Shards:
        """Whole rows on each rank; sums over the mesh (the factored rest rule's column sums)."""
        rows = param.numel() // param.shape[-1] if param.dim() >= 2 else param.numel()
        return Shards(rows=rows, numel=param.numel(), sum_=self.sum_over_shards_)

    def sum_over_shards_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)

    def touched(self, index: int) -> None:
        pass

    def average_grads_(self, grads: list[tuple[int, torch.Tensor]]) -> None:
        pass

    def forget_grads(self) -> None:
        pass

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        pass  # fully_shard distributes the one model; nothing is replicated

    # ------------------------------------------------------------------ collectives

    def grad_norm(self, grad: torch.Tensor) -> float:
        """2-norm of the full gradient from the local shard: the squared local norms, summed."""
        # The local norm in the dtype one process would use, squared and summed in float64 so
        # the sum adds no rounding of its own; every rank receives the identical sum.
        local = local_view(grad).detach()
        norm = torch.tensor([local_grad_norm(local)], dtype=torch.float64, device=local.device)
        squared = norm.square()
        dist.all_reduce(squared, group=self.group)
        return float(squared.sqrt().item())

    def average_loss(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over the ranks (the loss differs per rank; the trigger may not)."""
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.group)
        return float(total.item()) / self.world_size

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on every rank."""
        failures = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(failures, group=self.group)
        return int(failures.item()) == 0

    def staying(self, old: Coordinates, new: Coordinates) -> set[int]:
        """Indices whose selection is unchanged from ``old`` to ``new`` on *every* rank.

        A partly selected tensor keeps its moments only when its coordinates are the same on all
        shards; deciding per rank would restart the moments (and Adam's step count) on some
        shards of a tensor and not on others.
        """
        stays: set[int] = set()
        partial: list[int] = []
        same: list[int] = []
        for index in sorted(old):
            if index not in new:
                continue
            before, after = old[index], new[index]
            if before is None or after is None:
                if before is None and after is None:
                    stays.add(index)
                continue
            partial.append(index)
            same.append(int(same_coordinates(before, after)))
        if partial:
            votes = torch.tensor(same, dtype=torch.int64, device=self.device)
            dist.all_reduce(votes, group=self.group)
            stays.update(i for i, vote in zip(partial, votes.tolist()) if vote == self.world_size)
        return stays

    # ------------------------------------------------------------------ global counts

    def remember_count(self, coordinates: torch.Tensor, count: int) -> None:
        """Record how many coordinates all ranks together hold for this local coordinate list."""
        self._counts = {key: entry for key, entry in self._counts.items() if entry[0]() is not None}
        self._counts[id(coordinates)] = (weakref.ref(coordinates), int(count))

    def count(self, coordinates: torch.Tensor) -> int:
        """The global count recorded for ``coordinates``; its local length if none was recorded.

        Counts are recorded by every selection and by :mod:`blockllm.distributed.fsdp2_checkpoint`'s loader;
        only a per-rank ``state_dict`` loaded by hand falls back to the local length until the
        next selection.
        """
        entry = self._counts.get(id(coordinates))
        if entry is not None and entry[0]() is coordinates:
            return entry[1]
        return coordinates.numel()
