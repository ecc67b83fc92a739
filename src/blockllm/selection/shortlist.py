"""Shortlists: a partly selected tensor's dense gradient reduced, on arrival, to what it can use.

On a selection step the scoring pass holds the gradients of the plan's tensors until ``step()``
picks the coordinates. A tensor in the plan's partial set will get at most ``min(size, cap)``
coordinates (or the budget, uncapped), typically a small share of an embedding or an output head,
yet its dense gradient (as large as the tensor) would be held until then; two vocabulary
matrices held at once made the selection step's gradient peak twice the largest tensor's.

A :class:`Shortlist` keeps instead the only coordinates the selection can still pick, and their
gradient: for rows, the ``max // row_size + 1`` rows with the largest norm whole, plus the
``row_size`` largest entries outside them (candidates for the leftover coordinates); for single
coordinates, the ``max`` largest. Every ranking here uses the order of
:func:`~blockllm.selection.packing.top_coordinates` (magnitude, then lowest index), under which
the shortlist is a prefix of the tensor's own order, so the coordinates picked from it are the
ones the dense gradient would give, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockllm.selection.coordinates import RowCoordinates, Selected, compact_index, gather
from blockllm.selection.packing import _top_outside_rows, top_coordinates
from blockllm.selection.scorers import row_norms, squared_norm


@dataclass
class Shortlist:
    """Candidate coordinates of one tensor (``kept``, layout order) and their gradient."""

    kept: Selected
    values: torch.Tensor
    squares: torch.Tensor  # squared 2-norm of the whole gradient it was made from (fp32)

    @property
    def nbytes(self) -> int:
        kept = self.kept
        index = kept.nbytes if isinstance(kept, RowCoordinates) else kept.numel() * 4
        return index + self.values.numel() * self.values.element_size()

    def add_(self, grad: torch.Tensor) -> None:
        """Accumulate a later micro-batch's dense gradient at the kept coordinates.

        The squared norm then adds the new part's (the cross term is unknown: an estimate;
        ``BlockLLM.hold_gradients()`` avoids it by shortlisting only the whole step's gradient).
        """
        self.values.add_(gather(grad, self.kept).to(self.values.dtype))
        # No squared copy: a vocabulary matrix's would be one more full-size tensor at the
        # selecting step's peak.
        self.squares = self.squares + squared_norm(grad.detach())


def make_shortlist(grad: torch.Tensor, most: int, row_size: int) -> Shortlist:
    """The shortlist of a tensor that will get at most ``most`` coordinates."""
    flat = grad.detach().reshape(-1)
    if row_size > 1:
        num_rows = flat.numel() // row_size
        by_row = flat.view(num_rows, row_size)
        norms = row_norms(by_row)
        rows = top_coordinates(norms, min(num_rows, most // row_size + 1))
        outside = flat.numel() - rows.numel() * row_size
        if outside > 0:
            taken = torch.zeros(num_rows, dtype=torch.bool, device=flat.device)
            taken[rows] = True
            extra = _top_outside_rows(by_row, taken, min(row_size, outside))
        else:
            extra = rows.new_zeros(0)
        kept: Selected = RowCoordinates(
            compact_index(rows, num_rows), compact_index(extra, flat.numel()), row_size
        )
    else:
        kept = compact_index(top_coordinates(flat.abs(), min(most, flat.numel())), flat.numel())
    return Shortlist(kept, gather(flat, kept).clone(), squared_norm(flat))


def pick(shortlist: Shortlist, count: int) -> tuple[Selected, torch.Tensor]:
    """The ``count`` coordinates the dense gradient would give, and their gradient."""
    kept, values = shortlist.kept, shortlist.values
    if isinstance(kept, RowCoordinates):
        size = kept.row_size
        block = values[: kept.rows.numel() * size].view(-1, size)
        norms = row_norms(block)
        rows_wanted = min(count // size, kept.rows.numel())
        chosen = top_coordinates(norms, rows_wanted)  # positions in kept.rows, ascending
        leftover = count - rows_wanted * size
        parts = [block[chosen].reshape(-1)]
        extra = kept.extra[:0]
        if leftover > 0:
            # Candidates: the kept rows not chosen, and the kept entries outside the kept rows,
            # ranked in ascending flat index so that ties go to the lowest index.
            unchosen = torch.ones(kept.rows.numel(), dtype=torch.bool, device=block.device)
            unchosen[chosen] = False
            offsets = torch.arange(size, device=block.device)
            flat_rows = kept.rows.long()[unchosen].unsqueeze(1) * size + offsets
            candidates = torch.cat([flat_rows.reshape(-1), kept.extra.long()])
            candidate_values = torch.cat([block[unchosen].reshape(-1), values[block.numel() :]])
            order = candidates.argsort()
            best = order[top_coordinates(candidate_values[order].abs(), leftover)]
            extra = candidates[best].to(kept.extra.dtype)
            parts.append(candidate_values[best])
        picked = RowCoordinates(kept.rows[chosen], extra, size)
        return picked, torch.cat(parts)
    best = top_coordinates(values.abs(), count)  # kept is ascending: ties to the lowest index
    return kept[best], values[best]


__all__ = ["Shortlist", "make_shortlist", "pick"]
