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

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, runtime_checkable

import torch

from blockllm.selection.coordinates import RowCoordinates, Selected, compact_index
from blockllm.selection.scorers import row_norms


@dataclass(frozen=True)
class Plan:
    """A tentative selection built from the scores seen so far.

    Attributes:
        whole: candidate indices taken whole.
        partial: candidate indices that receive only some coordinates.
        remainder: coordinates to hand out inside ``partial`` (for the whole-tensor packer: to
            the last of them, the first tensor that did not fit).
        counts: whole-tensor packer: the coordinates of each ``partial`` tensor.
    """

    whole: tuple[int, ...]
    partial: tuple[int, ...]
    remainder: int
    # WholeTensorPacker only: coordinates for each of ``partial`` (capped tensors, then the one
    # that did not fit, which gets ``remainder``).
    counts: tuple[int, ...] = ()

    @property
    def members(self) -> frozenset[int]:
        return frozenset(self.whole) | frozenset(self.partial)


Coordinates = dict[int, Selected | None]
"""Candidate index -> its selected coordinates (:mod:`blockllm.selection.coordinates`: flat
indices, or whole rows plus leftovers), or ``None`` for the whole tensor."""


class BudgetPacker(Protocol):
    def plan(self, scores: dict[int, float]) -> Plan: ...

    def coordinates(self, plan: Plan, grads: dict[int, torch.Tensor]) -> Coordinates: ...


def _ranked(scores: dict[int, float]) -> list[int]:
    # Ties are broken by candidate position so every rank and every rerun agrees.
    return sorted(scores, key=lambda index: (-scores[index], index))


_SAMPLE = 1 << 16
_MARGIN = 0.01


def top_coordinates(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices of the ``count`` largest entries of the 1-D tensor ``magnitude``.

    Ties at the threshold go to the lowest indices, the rule the sharded picker
    (:mod:`blockllm.distributed.fsdp2_top`) follows over dim-0 shards, so one process and FSDP2
    choose the same coordinates even where many gradients tie (at zero, typically, for the rows
    of tokens a batch does not contain).

    ``torch.topk`` with a large ``count`` costs about a second on a 16M-entry embedding gradient
    on two CPU cores. Instead, bracket the threshold with quantiles of a strided sample: every
    entry above the upper bracket is in for sure, and ``topk`` runs only on the thin band between
    the brackets to find the threshold. When the sample misleads (the brackets do not hold the
    count), the full ``topk`` finds it.
    """
    total = magnitude.numel()
    if count >= total:
        return torch.arange(total, device=magnitude.device)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=magnitude.device)
    threshold = _kth_largest(magnitude, count)
    return _threshold_mask(magnitude, threshold, count).nonzero().squeeze(1)


def _kth_largest(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count``-th largest entry of ``magnitude`` (1-D, ``0 < count < numel``)."""
    total = magnitude.numel()
    if total > 4 * _SAMPLE:
        sample = magnitude[:: total // _SAMPLE].float()
        keep = 1.0 - count / total
        levels = torch.tensor(
            [max(0.0, keep - _MARGIN), min(1.0, keep + _MARGIN)], device=sample.device
        )
        low, high = torch.quantile(sample, levels).tolist()
        certain = int((magnitude > high).sum())
        band = magnitude[(magnitude >= low) & (magnitude <= high)]
        if certain < count <= certain + band.numel():
            return torch.topk(band, count - certain, sorted=False).values.min()
    return torch.topk(magnitude, count, sorted=False).values.min()


def _threshold_mask(magnitude: torch.Tensor, threshold: torch.Tensor, count: int) -> torch.Tensor:
    """Entries above ``threshold``, then ties at it by lowest index, ``count`` in all."""
    mask = magnitude > threshold
    need = count - int(mask.sum())
    if need > 0:
        mask[_first_ties(magnitude, threshold, need)] = True
    return mask


def _first_ties(magnitude: torch.Tensor, threshold: torch.Tensor, need: int, offset: int = 0) -> torch.Tensor:
    """Indices (plus ``offset``) of the first ``need`` entries equal to ``threshold``, chunk by
    chunk: where most entries tie (zeros: the rows of tokens a batch lacks), listing every tie
    would be an int64 index as large as the tensor, twice its fp32 size, at the selection's peak."""
    found: list[torch.Tensor] = []
    for start in range(0, magnitude.numel(), _CHUNK_ENTRIES):
        chunk = magnitude[start : start + _CHUNK_ENTRIES]
        ties = (chunk == threshold).nonzero().squeeze(1)[:need]
        found.append(ties + (start + offset))
        need -= ties.numel()
        if need <= 0:
            break
    return torch.cat(found) if found else magnitude.new_zeros(0, dtype=torch.long)


def _top_coordinates(grad: torch.Tensor, count: int) -> torch.Tensor:
    return top_coordinates(grad.detach().reshape(-1).abs(), count)


class WholeTensorPacker:
    """Tensors in score order, each taking what it needs up to its cap, until the budget is spent.

    Tensor ``i`` takes ``min(size_i, cap_i, budget left)`` coordinates: whole when that is its
    size, partly otherwise. The first tensor that cannot have ``min(size, cap)`` gets what is left
    and ends the plan. Without caps this is "whole tensors while they fit, the remainder on the
    first that does not". A cap keeps one huge tensor (an embedding, an output head) from taking
    the whole budget at the expense of every other block.

    Still a score-ordered prefix, and still monotone: the budget used before any tensor is
    ``min(k, sum of min(size, cap) over the tensors ranked above it)``, which arrivals can only
    raise, so a tensor once left out stays out.

    Args:
        sizes: coordinates of each candidate.
        budget: k.
        caps: the most coordinates each candidate may take (None: no cap).
        row_sizes: coordinates per row (``numel // shape[0]``) of each candidate; when given, a
            partly selected tensor takes whole rows by gradient row norm (see
            :func:`top_rows`); None: the largest-|G| coordinates.
    """

    def __init__(
        self,
        sizes: list[int],
        budget: int,
        caps: list[int] | None = None,
        row_sizes: list[int] | None = None,
    ) -> None:
        self.sizes = sizes
        self.budget = budget
        self.caps = caps
        self.row_sizes = row_sizes

    def plan(self, scores: dict[int, float]) -> Plan:
        left = self.budget
        whole: list[int] = []
        partial: list[int] = []
        counts: list[int] = []
        for index in _ranked(scores):
            size = self.sizes[index]
            if size == 0:
                continue
            wanted = size if self.caps is None else min(size, self.caps[index])
            if wanted > left:
                # The first tensor that does not get what it wants gets the remainder (possibly
                # none yet: a later, higher-scoring arrival can push a whole tensor out and free
                # budget) and ends the plan.
                return Plan(tuple(whole), (*partial, index), left, (*counts, left))
            if wanted == size:
                whole.append(index)
            else:
                partial.append(index)
                counts.append(wanted)
            left -= wanted
        return Plan(tuple(whole), tuple(partial), left, tuple(counts))

    def most(self, index: int) -> int:
        """The most coordinates ``index`` can ever get: its cap, or the budget uncapped."""
        cap = self.budget if self.caps is None else self.caps[index]
        return min(self.sizes[index], cap, self.budget)

    def row_size(self, index: int) -> int:
        return self.row_sizes[index] if self.row_sizes is not None else 1

    @staticmethod
    def counts(plan: Plan) -> dict[int, int]:
        """Coordinates of each partly selected tensor of ``plan``."""
        return dict(zip(plan.partial, plan.counts or (plan.remainder,) * len(plan.partial)))

    def coordinates(self, plan: Plan, grads: dict[int, torch.Tensor]) -> Coordinates:
        chosen: Coordinates = {index: None for index in plan.whole}
        counts = plan.counts or (plan.remainder,) * len(plan.partial)
        for index, count in zip(plan.partial, counts):
            grad = grads.get(index)
            if grad is None or count <= 0:
                continue
            if self.row_sizes is not None and self.row_sizes[index] > 1:
                chosen[index] = top_rows(grad, count, self.row_sizes[index])
            else:
                chosen[index] = compact_index(_top_coordinates(grad, count), grad.numel())
        return chosen


def top_rows(grad: torch.Tensor, count: int, row_size: int) -> RowCoordinates:
    """``count`` coordinates of ``grad`` taken as whole rows where possible.

    The ``count // row_size`` rows with the largest gradient norm come whole; the few
    coordinates left over (fewer than a row) are the largest-|G| ones outside those rows, so the
    budget is still used exactly. Rows suit the vocabulary matrices: an embedding row is one
    token's vector, an output-head row one token's logit weights, and the rows with large
    gradients are the tokens that matter in the data. Stored as row ids (a few kilobytes), not
    one index per coordinate.
    """
    flat = grad.detach().reshape(-1)
    num_rows = flat.numel() // row_size
    rows_wanted = min(count // row_size, num_rows)
    by_row = flat.view(num_rows, row_size)
    # Low-precision rows are reduced in fp32; fp32/fp64 ones in their own dtype.
    rows = top_coordinates(row_norms(by_row), rows_wanted)
    extra = count - rows_wanted * row_size
    if extra > 0:
        mask = torch.zeros(num_rows, dtype=torch.bool, device=flat.device)
        mask[rows] = True
        extra_index = _top_outside_rows(by_row, mask, extra)
    else:
        extra_index = rows.new_zeros(0)
    return RowCoordinates(
        compact_index(rows, num_rows), compact_index(extra_index, flat.numel()), row_size
    )


_CHUNK_ENTRIES = 1 << 20


def _top_outside_rows(by_row: torch.Tensor, taken: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` largest |G| entries outside the ``taken`` rows.

    ``count`` is less than a row, so each chunk of rows can only contribute its own best
    ``count`` entries: the threshold from those is the one a pass over the whole tensor would
    find, without the full-size magnitude copies (a 30k-row embedding's gradient would otherwise
    cost three or four times its own size at the selection step). A second pass takes what lies
    above it and the ties at it by lowest index, as :func:`top_coordinates` does.
    """
    num_rows, row_size = by_row.shape
    chunk = max(1, _CHUNK_ENTRIES // row_size)

    def blocks():
        for start in range(0, num_rows, chunk):
            stop = min(num_rows, start + chunk)
            block = by_row[start:stop].abs().float()
            # Taken rows are marked -1, below every magnitude.
            block.masked_fill_(taken[start:stop].unsqueeze(1), -1.0)
            yield start * row_size, block.reshape(-1)

    best = torch.cat(
        [torch.topk(block, min(count, block.numel()), sorted=False).values for _, block in blocks()]
    )
    threshold = best.min() if best.numel() <= count else _kth_largest(best, count)
    chosen = torch.cat([(block > threshold).nonzero().squeeze(1) + offset for offset, block in blocks()])
    need = count - chosen.numel()
    ties: list[torch.Tensor] = []
    for offset, block in blocks() if need > 0 else ():
        ties.append(_first_ties(block, threshold, need, offset))
        need -= ties[-1].numel()
        if need <= 0:
            break
    return torch.cat([chosen, *ties]).sort().values


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


def tensor_cap(sizes: list[int], budget: int, share: float) -> int:
    """The most coordinates one tensor may take: ``share`` of the budget, raised when needed.

    A cap must never leave budget unused: with few candidates (two big tensors and a share of
    0.25, say) the plain cap would. The cap is then raised to the smallest value at which the
    candidates together can take the whole budget. It is fixed per model, so plans stay
    monotone.
    """
    cap = max(1, math.floor(share * budget))
    if sum(min(size, cap) for size in sizes) >= budget:
        return cap
    low, high = cap, max(sizes)
    while low < high:
        middle = (low + high) // 2
        if sum(min(size, middle) for size in sizes) >= budget:
            high = middle
        else:
            low = middle + 1
    return low


def budget_for(sparsity: float, total: int) -> int:
    """``k = floor((1 - sparsity) * total)``, in decimal arithmetic.

    ``(1 - 0.9) * 100`` is ``9.999...`` in binary floating point; users mean 10. Reading the
    float through its shortest decimal repr gives the value they typed.
    """
    return math.floor((1 - Fraction(repr(float(sparsity)))) * total)


@runtime_checkable
class SelectionRule(Protocol):
    """Builds the packer of a selection; plug in your own as ``selection=``.

    ``packer`` is called again whenever the candidates change (``add_param_group``). ``caps``
    (the most coordinates each candidate may take, from ``max_tensor_share``) and ``row_sizes``
    (coordinates per row, when ``partial="rows"``) are None when not in use; a rule may ignore
    them. The packer must keep its plans score-ordered prefixes (see the module docstring).
    """

    def packer(
        self,
        sizes: list[int],
        budget: int,
        caps: list[int] | None,
        row_sizes: list[int] | None,
    ) -> BudgetPacker: ...


class WholeTensors:
    """``selection="tensor"``: :class:`WholeTensorPacker`."""

    def packer(self, sizes, budget, caps, row_sizes) -> BudgetPacker:
        return WholeTensorPacker(sizes, budget, caps, row_sizes)


class PaperMask:
    """``selection="mask"``: :class:`PaperMaskPacker` (no caps, no rows: the paper's rule)."""

    def packer(self, sizes, budget, caps, row_sizes) -> BudgetPacker:
        return PaperMaskPacker(sizes, budget)


SELECTION_RULES = {"tensor": WholeTensors, "mask": PaperMask}


def make_selection_rule(spec: str | SelectionRule) -> SelectionRule:
    """The built-in rule ``spec`` names, or ``spec`` itself when an object.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(spec, str):
        return spec
    if spec not in SELECTION_RULES:
        choices = ", ".join(map(repr, SELECTION_RULES))
        raise ValueError(f"Invalid selection: {spec!r} (choose from {choices})")
    return SELECTION_RULES[spec]()
