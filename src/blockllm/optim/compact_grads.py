"""The gradients BlockLLM updates with, and the compacted ones it keeps outside ``.grad``.

A partly selected tensor (an embedding or an output head trained by rows, say) needs only its
selected coordinates' gradient, but autograd produces the dense one. With ``compact_grads=True``
:class:`CompactGradients` gathers the selected coordinates as each gradient lands and frees the
dense tensor at once, so a ``(vocab, hidden)`` gradient is never held until ``step()``; row
gradients (:mod:`blockllm.optim.row_gradients`) deposit here directly without building it.
"""

from __future__ import annotations

import torch

from blockllm.distributed.base import Communicator
from blockllm.selection.coordinates import gather
from blockllm.selection.packing import Coordinates


class CompactGradients:
    """Selected-coordinate gradients by candidate index, accumulated over micro-batches.

    Args:
        enabled: gather partly selected gradients in the hooks (``compact_grads``); when False,
            the store stays empty and dense gradients are gathered at ``step()`` instead.
        comm: the optimizer's communicator (local views; deposits are marked for averaging).

    Attributes:
        held: candidate index -> its selected coordinates' gradient.
        sources: objects that deposit here (row-gradient handles), kept alive with the store.
    """

    def __init__(self, enabled: bool, comm: Communicator) -> None:
        self.enabled = enabled
        self.local = comm.local
        self.touched = comm.touched
        self.held: dict[int, torch.Tensor] = {}
        self.sources: list[object] = []
        # Set by a step that applied the held gradients: the next gradient to land starts afresh
        # even when the loop zeroed only the model's gradients (Hugging Face Trainer calls
        # model.zero_grad(), never optimizer.zero_grad()). Until then they stay, like .grad.
        self.stale = False

    def add(self, index: int, part: torch.Tensor) -> None:
        """Deposit a micro-batch's selected-coordinate gradient computed outside autograd."""
        self.touched(index)  # no hook saw it: mark it for averaging here
        self._accumulate(index, part)

    def deposit(self, grads: dict[int, torch.Tensor]) -> None:
        """Take over the selected coordinates' gradients a selection step picked (averaged)."""
        for index, part in grads.items():
            self._accumulate(index, part)
        grads.clear()

    def _accumulate(self, index: int, part: torch.Tensor) -> None:
        if self.stale:
            self.clear()
        held = self.held.get(index)
        self.held[index] = part if held is None else held.add_(part)

    def capture(self, index: int, param: torch.Tensor, coordinates: torch.Tensor | None) -> None:
        """Called as ``param``'s gradient lands: keep its selected coordinates, free the rest."""
        grad = self.local(param.grad)
        if not self.enabled or coordinates is None or grad is None or grad.is_sparse:
            return
        self._accumulate(index, gather(grad, coordinates))  # the hook marked it already
        param.grad = None

    def clear(self) -> None:
        self.held.clear()
        self.stale = False

    @property
    def nbytes(self) -> int:
        return sum(grad.numel() * grad.element_size() for grad in self.held.values())

    def for_update(
        self, selection: Coordinates, params: list[torch.Tensor], names: list[str]
    ) -> dict[int, torch.Tensor]:
        """The gradient each selected block is updated with: whole, or its selected coordinates.

        Raises:
            RuntimeError: a selected tensor has a sparse gradient.
        """
        if self.stale:  # nothing landed since the last step: what is held was applied then
            self.clear()
        grads: dict[int, torch.Tensor] = {}
        for index, coordinates in selection.items():
            # FSDP2: the local shard; its coordinates are local to the shard too.
            grad = self.local(params[index].grad)
            if index in self.held and coordinates is not None:
                if grad is not None:  # a backward after the hooks compacted: add it in
                    self._accumulate(index, gather(grad, coordinates))
                    params[index].grad = None
                grads[index] = self.held[index]
                continue
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "BlockLLM does not support sparse gradients (nn.Embedding(sparse=True)); "
                    f"{names[index]!r} has one"
                )
            if coordinates is None:
                grads[index] = grad
            elif self.enabled:
                # A selection step: the coordinates were just chosen from the dense gradient,
                # which is not needed any more.
                grads[index] = self.held[index] = gather(grad, coordinates)
                params[index].grad = None
            else:
                grads[index] = gather(grad, coordinates)
        return grads


__all__ = ["CompactGradients"]
