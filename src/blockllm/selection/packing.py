"""Budget packing: which blocks (and which of their coordinates) fit a budget of k coordinates.

Two packers share one interface so the optimizer can stream gradients through either:

* :class:`WholeTensorPacker` (our default, ``selection="tensor"``): whole tensors enter in score
  order while they fit; the budget left over goes to the largest-|G| coordinates of the first
  (best-scoring) tensor that did not fit. A model whose every tensor is larger than k still
  trains, and no budget is wasted.
* :class:`PaperMaskPacker` (``selection="mask"``): the paper's variant. Tensors enter in score order
  until together they hold at least k coordinates; inside them only coordinates with
  ``|G| >= tau`` are updated, ``tau`` chosen so that exactly k are.

Both plans are score-ordered *prefixes*, and so *monotone*: a tensor outside the plan built from
some of the scores is ranked behind tensors that together already exceed the budget; arrivals
only add to what stands before it, so it stays outside. That is what lets the optimizer free a
gradient as soon as the plan excludes it, so no full-model gradient ever exists. (Skipping a
tensor that does not fit and packing smaller, lower-scoring ones behind it would not be monotone:
a later arrival can push a packed tensor out and reopen room for one already freed.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Plan:
    """A tentative selection built from the scores seen so far.

    Attributes:
        whole: candidate indices taken whole.
        partial: candidate indices that receive only some coordinates.
        remainder: coordinates to hand out inside ``partial``.
    """

    whole: tuple[int, ...]
    partial: tuple[int, ...]
    remainder: int

    @property
    def members(self) -> frozenset[int]:
        return frozenset(self.whole) | frozenset(self.partial)


Coordinates = dict[int, torch.Tensor | None]
"""Candidate index -> sorted flat coordinates, or ``None`` for the whole tensor.

Coordinates are int32 when the tensor has fewer than 2**31 entries (they are optimizer state,
kept for as long as the selection lasts, so their bytes count), int64 otherwise.
"""


def compact_index(index: torch.Tensor, numel: int) -> torch.Tensor:
    return index.to(torch.int32) if numel < 2**31 else index.to(torch.int64)


class BudgetPacker(Protocol):
    def plan(self, scores: dict[int, float]) -> Plan: ...

    def coordinates(self, plan: Plan, grads: dict[int, torch.Tensor]) -> Coordinates: ...


def _ranked(scores: dict[int, float]) -> list[int]:
    # Ties are broken by candidate position so every rank and every rerun agrees.
    return sorted(scores, key=lambda index: (-scores[index], index))


_SAMPLE = 1 << 16
_MARGIN = 0.01


def top_coordinates(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices of ``count`` largest entries of the 1-D tensor ``magnitude``.

    ``torch.topk`` with a large ``count`` costs about a second on a 16M-entry embedding gradient
    on two CPU cores. Instead, bracket the threshold with quantiles of a strided sample: every
    entry above the upper bracket is in for sure, and ``topk`` runs only on the thin band between
    the brackets. A mask turned into indices comes out sorted for free. When the sample misleads
    (the brackets do not hold the count), fall back to the full ``topk``; the result is the same
    set of coordinates either way, up to ties.
    """
    total = magnitude.numel()
    if count >= total:
        return torch.arange(total, device=magnitude.device)
    if total > 4 * _SAMPLE:
        sample = magnitude[:: total // _SAMPLE].float()
        keep = 1.0 - count / total
        levels = torch.tensor(
            [max(0.0, keep - _MARGIN), min(1.0, keep + _MARGIN)], device=sample.device
        )
        low, high = torch.quantile(sample, levels).tolist()
        certain = magnitude > high
        band = (magnitude >= low) & ~certain
        num_certain = int(certain.sum())
        num_band = int(band.sum())
        if num_certain <= count <= num_certain + num_band:
            band_index = band.nonzero().squeeze(1)
            best = torch.topk(magnitude[band_index], count - num_certain, sorted=False).indices
            certain[band_index[best]] = True
            return certain.nonzero().squeeze(1)
    chosen = torch.topk(magnitude, count, sorted=False).indices
    return chosen.sort().values


def _top_coordinates(grad: torch.Tensor, count: int) -> torch.Tensor:
    return top_coordinates(grad.detach().reshape(-1).abs(), count)


class WholeTensorPacker:
    """Whole tensors in score order while they fit; the remainder on the first one that does not."""

    def __init__(self, sizes: list[int], budget: int) -> None:
        self.sizes = sizes
        self.budget = budget

    def plan(self, scores: dict[int, float]) -> Plan:
        left = self.budget
        whole: list[int] = []
        for index in _ranked(scores):
            size = self.sizes[index]
            if size == 0:
                continue
            if size > left:
                # The first tensor that does not fit gets the remainder (possibly none yet: a
                # later, higher-scoring arrival can push a whole tensor out and free budget).
                return Plan(tuple(whole), (index,), left)
            whole.append(index)
            left -= size
        return Plan(tuple(whole), (), left)

    def coordinates(self, plan: Plan, grads: dict[int, torch.Tensor]) -> Coordinates:
        chosen: Coordinates = {index: None for index in plan.whole}
        for index in plan.partial:
            grad = grads.get(index)
            if grad is not None and plan.remainder > 0:
                chosen[index] = compact_index(_top_coordinates(grad, plan.remainder), grad.numel())
        return chosen


class PaperMaskPacker:
    """The paper's rule: a score-ordered prefix covering k, then a magnitude threshold inside it."""

    def __init__(self, sizes: list[int], budget: int) -> None:
        self.sizes = sizes
        self.budget = budget

    def plan(self, scores: dict[int, float]) -> Plan:
        prefix: list[int] = []
        covered = 0
        for index in _ranked(scores):
            if covered >= self.budget:
                break
            if self.sizes[index] == 0:
                continue
            prefix.append(index)
            covered += self.sizes[index]
        if covered <= self.budget:
            return Plan(tuple(prefix), (), 0)
        return Plan((), tuple(prefix), self.budget)

    def coordinates(self, plan: Plan, grads: dict[int, torch.Tensor]) -> Coordinates:
        chosen: Coordinates = {index: None for index in plan.whole}
        present = [index for index in plan.partial if grads.get(index) is not None]
        if not present:
            return chosen
        flat = torch.cat([grads[index].detach().reshape(-1).abs().float() for index in present])
        count = min(plan.remainder, flat.numel())
        # Exactly `count` coordinates: tau is the count-th largest |G|, ties broken arbitrarily.
        top = top_coordinates(flat, count)
        start = 0
        for index in present:
            stop = start + self.sizes[index]
            lo, hi = torch.searchsorted(top, torch.tensor([start, stop], device=top.device)).tolist()
            local = top[lo:hi] - start
            if local.numel() == self.sizes[index]:
                chosen[index] = None
            elif local.numel() > 0:
                chosen[index] = compact_index(local, self.sizes[index])
            start = stop
        return chosen


def make_packer(selection: str, sizes: list[int], budget: int) -> BudgetPacker:
    if selection == "tensor":
        return WholeTensorPacker(sizes, budget)
    return PaperMaskPacker(sizes, budget)
