"""What a :class:`~blockllm.BlockLLM` lets you look at: the selection, the budget, the memory.

A mixin of read-only views, kept apart from the update: everything here reads the optimizer's
selector, candidates, communicator and gradient flow, and changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from blockllm.optim.memory_report import count_bytes
from blockllm.selection.coordinates import as_flat


class SelectionViews:
    """Read-only views of a BlockLLM optimizer (mixed into :class:`~blockllm.BlockLLM`)."""

    sparsity = property(lambda self: self.config.sparsity)
    patience = property(lambda self: self.config.patience)
    compact_grads = property(lambda self: self.config.compact_grads)
    selector = property(lambda self: self._selector, doc="The selection engine.")
    communicator = property(lambda self: self._comm, doc="How this optimizer talks to its peers.")
    compact_gradients = property(lambda self: self._flow.compact, doc="Grads kept outside .grad.")
    budget = property(lambda self: self._selector.budget, doc="k: the most coordinates per step.")
    num_coordinates = property(lambda self: self._selector.total, doc="N: candidate coordinates.")
    num_candidates = property(lambda self: len(self._candidates))
    candidate_names = property(lambda self: list(self._candidates.names))
    num_selected = property(
        lambda self: self._selector.num_selected,
        doc="Coordinates Adam updates now, <= k (with a rest rule the others move too, by it).",
    )
    num_selections = property(lambda self: self._selector.num_selections)
    num_reselections = property(lambda self: self._selector.num_reselections)
    selection_seconds = property(lambda self: self._selector.selection_seconds)
    peak_selection_grad_bytes = property(lambda self: self._selector.peak_selection_grad_bytes)
    selection_pending = property(lambda self: self._selector.pending, doc="Next backward scores.")

    @property
    def process_group(self) -> Any:
        """The process group gradients are averaged over, or None (no communication)."""
        return self._comm.process_group

    @property
    def selected(self) -> list[str]:
        """Names of the tensors selected now (in candidate order)."""
        return [self._candidates.names[index] for index in sorted(self._selector.selection)]

    @property
    def visit_counts(self) -> dict[str, int]:
        return dict(zip(self._candidates.names, self._selector.visits))

    @property
    def trainable_fraction(self) -> float:
        """Selected (Adam's) coordinates over all candidate coordinates."""
        return self.num_selected / self._selector.total

    def named_candidates(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every candidate, in candidate order."""
        return list(zip(self._candidates.names, self._candidates.params))

    def candidate_index(self, param: torch.Tensor) -> int | None:
        """The candidate index of ``param``; None when it is no candidate."""
        return self._candidates.index(param)

    def coordinates(self, name: str) -> torch.Tensor | None:
        """Flat indices of the selected coordinates of ``name``; ``None`` when it is whole.

        In the order of the tensor's compact gradient and moments: for a tensor trained by rows,
        row by row, then the few leftover coordinates.
        """
        index = self._candidates.names.index(name)
        if index not in self._selector.selection:
            raise KeyError(f"{name!r} is not selected now")
        return as_flat(self._selector.selection[index])

    def memory_report(self) -> dict[str, int]:
        """Bytes held now, by category, counted from the tensors that exist.

        ``params``: every parameter in the param groups; ``grads``: their ``.grad`` tensors (and
        compacted gradients); ``optimizer_state``: Adam moments, step counters and coordinate
        lists (and the moments ``keep_moments`` keeps for blocks away from the selection);
        ``master_weights``: fp32 copies of low-precision blocks.
        """
        return count_bytes(
            self.param_groups, self.state, self._selector.selection.values(),
            self._flow.compact.nbytes, self._comm.local,
            (0 if self._flow.rest is None else self._flow.rest.state_bytes) + self._parked_bytes,
        )  # fmt: skip

    @property
    def _parked_bytes(self) -> int:
        """The moments ``keep_moments`` holds for blocks away from the selection."""
        return sum(
            value.numel() * value.element_size()
            for entry in self._parked.values()
            for value in entry.values()
        )


__all__ = ["SelectionViews"]
