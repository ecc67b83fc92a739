"""How a BlockLLM optimizer agrees with its peers: one strategy object, three kinds.

Everything the optimizer and its selector need from other processes goes through a
:class:`Communicator`, so neither branches on "am I distributed?". There are three:

* :class:`SingleProcess`: no peers; every method is the identity or a local computation.
* :class:`~blockllm.distributed.process_group.ProcessGroupSync`: data parallelism without DDP
  (``BlockLLM(process_group=...)``). Gradients, the loss and the scores are averaged here, each
  exactly once per step, and parameters are broadcast from the first rank at construction.
* :class:`~blockllm.distributed.fsdp2.FSDP2Sync`: FSDP2 (``fully_shard``). FSDP averages the
  gradients itself; this one makes the ranks agree on scores, coordinates and decisions while each
  holds only its shard.

:func:`choose_communicator` picks one from the parameters and the ``process_group`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from blockllm.selection.packing import BudgetPacker, Coordinates
from blockllm.selection.rest_rules import Shards
from blockllm.selection.scorers import grad_norm


@runtime_checkable
class Communicator(Protocol):
    """What BlockLLM asks of its peers. Collective methods are called on every rank in one order.

    Attributes:
        process_group: the group gradients are averaged over by BlockLLM, or None.
        syncs_gradients: True when BlockLLM averages gradients itself (a training loop must then
            leave gradients and the loss alone; see :class:`blockllm.optim.protocols.SyncsItself`).
        shards_parameters: True when each rank holds only a shard of every parameter (FSDP2).
        bytes_communicated: payload bytes of gradient collectives so far (for benchmarks).
    """

    process_group: Any
    syncs_gradients: bool
    shards_parameters: bool
    bytes_communicated: int

    def local(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The part of ``tensor`` this rank holds (a view), or the tensor itself."""
        ...

    def shards(self, param: torch.Tensor) -> Shards | None:
        """How ``param``'s gradient is split over the ranks (FSDP2), for a rest rule whose
        statistics span the whole tensor; None when every rank holds it whole."""
        ...

    def grad_norm(self, grad: torch.Tensor) -> float:
        """2-norm of a candidate's whole (averaged) gradient."""
        ...

    def sum_over_shards_(self, tensor: torch.Tensor) -> None:
        """Sum, in place, a quantity each rank measured on its shards (FSDP2: squared norms);
        nothing when every rank holds whole tensors."""
        ...

    def touched(self, index: int) -> None:
        """Candidate ``index``'s gradient received a local contribution not averaged yet."""
        ...

    def average_grads_(self, grads: list[tuple[int, torch.Tensor]]) -> None:
        """Average, in place, the ``(candidate index, gradient)`` pairs whose index was touched."""
        ...

    def forget_grads(self) -> None:
        """Gradients were zeroed: nothing is pending."""
        ...

    def average_loss(self, value: float, device: torch.device) -> float:
        """The loss every rank's trigger sees: the mean over ranks."""
        ...

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Make every rank's ``tensors`` equal to the first rank's."""
        ...

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank that holds a part of the state."""
        ...

    def packer(self, inner: BudgetPacker, params: Sequence[torch.Tensor]) -> BudgetPacker:
        """``inner``, or a wrapper that picks coordinates from gradients spread over ranks."""
        ...

    def staying(self, old: Coordinates, new: Coordinates) -> set[int] | None:
        """Candidates whose selection did not change on any rank; None: decide locally."""
        ...

    def count(self, coordinates: torch.Tensor) -> int:
        """Coordinates of a partly selected tensor over all ranks (``numel`` in one process)."""
        ...


def local_grad_norm(grad: torch.Tensor) -> float:
    """``||grad||_2`` (:func:`~blockllm.selection.scorers.grad_norm`) as a float."""
    return float(grad_norm(grad))


class SingleProcess:
    """No peers: nothing to average, agree on or gather."""

    process_group = None
    syncs_gradients = False
    shards_parameters = False
    bytes_communicated = 0

    def local(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor

    def shards(self, param: torch.Tensor) -> Shards | None:
        return None

    def sum_over_shards_(self, tensor: torch.Tensor) -> None:
        pass

    def grad_norm(self, grad: torch.Tensor) -> float:
        return local_grad_norm(grad)

    def touched(self, index: int) -> None:
        pass

    def average_grads_(self, grads: list[tuple[int, torch.Tensor]]) -> None:
        pass

    def forget_grads(self) -> None:
        pass

    def average_loss(self, value: float, device: torch.device) -> float:
        return value

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def all_true(self, flag: bool) -> bool:
        return flag

    def packer(self, inner: BudgetPacker, params: Sequence[torch.Tensor]) -> BudgetPacker:
        return inner

    def staying(self, old: Coordinates, new: Coordinates) -> set[int] | None:
        return None

    def count(self, coordinates: torch.Tensor) -> int:
        return coordinates.numel()


def choose_communicator(
    names: Sequence[str], params: Sequence[torch.Tensor], process_group: Any
) -> Communicator:
    """The communicator for these candidates: FSDP2 when they are DTensors, else by group.

    Raises:
        ValueError: an FSDP1 model, a DDP-wrapped model without a group, mixed or unsupported
            FSDP2 layouts, or
            FSDP2 parameters together with a ``process_group``.
        RuntimeError: a ``process_group`` before ``torch.distributed`` is initialized.
    """
    # Imported here: they pull in torch.distributed's tensor machinery, which a single-process
    # user never needs to load.
    from blockllm.distributed.fsdp2 import FSDP2Sync
    from blockllm.distributed.process_group import (
        ProcessGroupSync,
        check_not_ddp_wrapped,
        check_not_fsdp1_wrapped,
    )

    check_not_fsdp1_wrapped(names)
    check_not_ddp_wrapped(names, process_group)
    sharded = FSDP2Sync.detect(names, params, process_group)
    if sharded is not None:
        return sharded
    if process_group is not None:
        return ProcessGroupSync(process_group)
    return SingleProcess()


__all__ = ["Communicator", "SingleProcess", "choose_communicator", "local_grad_norm"]
