"""The selected coordinates of a partly selected tensor, stored as cheaply as they can be.

A partly selected tensor's coordinates are Adam state for as long as the selection lasts, so
their bytes count. Picked one by one they are a flat index tensor (``int32`` where the tensor has
fewer than 2**31 entries). Picked as whole rows (``partial="rows"``, the default) they are
:class:`RowCoordinates`: the row ids and the few leftover coordinates, a few kilobytes where a
flat index would cost 4 bytes per coordinate (half as much again as the two moments' 8).

Both kinds go through the functions here, which gather and scatter in one fixed order, the
*layout* of the tensor's compact gradient and moments: for rows, every selected row's entries
in row order, then the leftover coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compact_index(index: torch.Tensor, numel: int) -> torch.Tensor:
    """``index`` as int32 when it fits (half the bytes of int64), else int64."""
    return index.to(torch.int32) if numel < 2**31 else index.to(torch.int64)


@dataclass(frozen=True, eq=False)
class RowCoordinates:
    """Whole rows (``rows``, sorted) of a row-major tensor plus ``extra`` flat coordinates.

    Behaves like the flat index tensor it stands for where the optimizer needs one:
    ``numel()``, ``long()`` (the flat indices in layout order), ``to()``, ``cpu()``,
    ``clone()``, ``detach()``.
    """

    rows: torch.Tensor
    extra: torch.Tensor
    row_size: int

    def numel(self) -> int:
        return self.rows.numel() * self.row_size + self.extra.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.extra))

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def long(self) -> torch.Tensor:
        offsets = torch.arange(self.row_size, device=self.rows.device)
        blocks = (self.rows.long().unsqueeze(1) * self.row_size + offsets).reshape(-1)
        return torch.cat([blocks, self.extra.long()])

    def to(self, device: torch.device | str) -> RowCoordinates:
        return RowCoordinates(self.rows.to(device), self.extra.to(device), self.row_size)

    def cpu(self) -> RowCoordinates:
        return self.to("cpu")

    def clone(self) -> RowCoordinates:
        return RowCoordinates(self.rows.clone(), self.extra.clone(), self.row_size)

    def detach(self) -> RowCoordinates:
        return self


Selected = torch.Tensor | RowCoordinates
"""One tensor's selected coordinates: a flat index tensor or :class:`RowCoordinates`."""


def gather(tensor: torch.Tensor, coordinates: Selected) -> torch.Tensor:
    """The entries of ``tensor`` at ``coordinates``, in layout order, as a new 1-D tensor."""
    flat = tensor.reshape(-1)
    if isinstance(coordinates, RowCoordinates):
        rows = flat.view(-1, coordinates.row_size).index_select(0, coordinates.rows)
        if coordinates.extra.numel() == 0:  # whole rows only: no second copy through cat
            return rows.reshape(-1)
        return torch.cat([rows.reshape(-1), flat.index_select(0, coordinates.extra)])
    return flat.index_select(0, coordinates)


def scatter_(param: torch.Tensor, coordinates: Selected, values: torch.Tensor) -> None:
    """Write ``values`` (in layout order) into ``coordinates`` of ``param``, in place."""
    values = values.to(param.dtype)
    if not param.is_contiguous():
        flat = param.detach().reshape(-1).clone()
        scatter_(flat, coordinates, values)
        param.copy_(flat.view_as(param))
        return
    flat = param.view(-1)
    if isinstance(coordinates, RowCoordinates):
        split = coordinates.rows.numel() * coordinates.row_size
        by_row = flat.view(-1, coordinates.row_size)
        by_row.index_copy_(0, coordinates.rows.long(), values[:split].view(-1, coordinates.row_size))
        flat.index_copy_(0, coordinates.extra.long(), values[split:])
        return
    # Flat coordinates are int32 when they fit (half the bytes); index_copy_ wants int64.
    flat.index_copy_(0, coordinates.long(), values)


def fill_(tensor: torch.Tensor, coordinates: Selected, value: float) -> None:
    """Set ``tensor``'s entries at ``coordinates`` to ``value``, in place (contiguous tensor)."""
    flat = tensor.view(-1)
    if isinstance(coordinates, RowCoordinates):
        flat.view(-1, coordinates.row_size).index_fill_(0, coordinates.rows.long(), value)
        flat.index_fill_(0, coordinates.extra.long(), value)
    else:
        flat.index_fill_(0, coordinates.long(), value)


def index_bytes(coordinates: Selected) -> int:
    """Bytes the coordinates themselves occupy."""
    if isinstance(coordinates, RowCoordinates):
        return coordinates.nbytes
    return coordinates.numel() * coordinates.element_size()


def same(old: Selected | None, new: Selected | None) -> bool:
    """True when two selections of one tensor are the same coordinates in the same layout."""
    if old is None or new is None:
        return old is None and new is None
    if isinstance(old, RowCoordinates) != isinstance(new, RowCoordinates):
        return False
    if isinstance(old, RowCoordinates):
        return (
            old.row_size == new.row_size
            and torch.equal(old.rows, new.rows)
            and torch.equal(old.extra, new.extra)
        )
    return old.shape == new.shape and bool(torch.equal(old, new))


def as_flat(coordinates: Selected | None) -> torch.Tensor | None:
    """Flat indices in layout order (int32 where they fit); flat coordinates come back as they are."""
    if isinstance(coordinates, RowCoordinates):
        flat = coordinates.long()
        return compact_index(flat, int(flat.max()) + 1 if flat.numel() else 0)
    return coordinates


def to_saved(coordinates: Selected) -> torch.Tensor:
    """The flat index tensor a checkpoint stores (layout order, so the saved moments match)."""
    return as_flat(coordinates).detach().cpu().clone()


__all__ = [
    "RowCoordinates",
    "as_flat",
    "Selected",
    "compact_index",
    "fill_",
    "gather",
    "index_bytes",
    "same",
    "scatter_",
    "to_saved",
]
