"""One selection in progress, fed by per-tensor gradient hooks during a backward pass.

Every candidate takes part in the backward of a selection step. As each tensor's gradient is
accumulated, :meth:`ScoringPass.observe` scores it and rebuilds the tentative plan; gradients
that the plan can no longer use are freed on the spot. So at any moment only the plan's own
gradients (about k coordinates, plus the one tensor autograd is producing) are held.

Under gradient accumulation with a rest rule every gradient is held until the step's gradient
is whole, so the optimizer feeds this pass only then (the last backward's hooks, or ``step()``)
and the ranking is one big batch's. Without one (``rest="none"``) the ranking comes from the
first backward of the selection step (the scores cannot wait for later micro-batches without
holding every gradient); the coordinates of a partly selected tensor and the update itself use
the step's whole accumulated gradient. The first backward is known to be over when a tensor
reports a second time (or at ``step()``); from then on tensors outside the plan are frozen and
their gradients dropped as they arrive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from blockllm.selection.coordinates import Selected
from blockllm.selection.packing import BudgetPacker, Coordinates, Plan, WholeTensorPacker
from blockllm.selection.shortlist import Shortlist, make_shortlist, pick

ScoreFn = Callable[[int, torch.Tensor], float]
AverageFn = Callable[[list[tuple[int, torch.Tensor]]], None]


class DeferredRest(Protocol):
    """A state-free rest rule that can step a shortlisted tensor in two parts (the optimizer's
    :class:`~blockllm.optim.rest_step.RestStepper`)."""

    def release_outside(self, index: int, kept: Selected) -> torch.Tensor: ...

    def apply_deferred(
        self,
        index: int,
        kept: Selected,
        step: torch.Tensor,
        picked: Selected | None,
        squares: torch.Tensor | None = None,
    ) -> None: ...


class ScoringPass:
    """Streams candidate gradients into a selection.

    Args:
        params: the candidate tensors, by candidate index.
        packer: turns scores into a plan and a plan into coordinates.
        score_fn: ``(candidate index, gradient) -> score``.
        average: data parallel: averages ``[(index, gradient)]`` over the ranks in place (each
            gradient once per local contribution), so that every rank ranks the same numbers.
        release: called with the index of a tensor whose gradient the selection cannot use, in
            place of freeing it (a state-free rule may step with it first); None: free it.
        freeze: freeze (``requires_grad=False``) the tensors outside the plan once the first
            backward is over, so later micro-batches skip them. Off when every candidate keeps
            training (a state-free rule for the rest): gradients outside the plan are then kept
            until released, since a later micro-batch adds to them.
        pinned: candidates outside the selection (always updated): never scored or released.
        shortlist: reduce the dense gradient of a tensor that joins the plan's partial set to
            its :class:`~blockllm.selection.shortlist.Shortlist` at once, except while this
            returns True (more micro-batches to come); None: never. Needs a
            :class:`WholeTensorPacker`; the picked coordinates' gradient is then handed over in
            ``chosen_grads``, not left in ``.grad``.
        deferred: with a rest rule stepped in the hooks, shortlists work too: the coordinates
            outside a shortlist take their rest step at once, and the shortlist's own take
            theirs once the selection has picked Adam's among them.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        packer: BudgetPacker,
        score_fn: ScoreFn,
        average: AverageFn | None = None,
        release: Callable[[int], None] | None = None,
        freeze: bool = True,
        pinned: frozenset[int] = frozenset(),
        shortlist: Callable[[], bool] | None = None,
        deferred: DeferredRest | None = None,
    ):
        self.params = params
        self.packer = packer
        self.score_fn = score_fn
        self.average = average
        self.release = release if release is not None else self._free
        self.freeze = freeze
        self.pinned = pinned
        self.scores: dict[int, float] = {}
        self.plan = Plan((), (), 0)
        self.closed = False
        self.chosen: Coordinates | None = None
        self.saw_nonfinite = False
        # Tensors whose gradient holds NaN/inf keep it: a GradScaler must see the overflow to
        # skip the step and lower its scale, and a freed gradient would hide it.
        self.nonfinite: set[int] = set()
        self.peak_held_bytes = 0
        self.shortlist_held = shortlist if isinstance(packer, WholeTensorPacker) else None
        self.shortlists: dict[int, Shortlist] = {}
        # The picked coordinates' gradient of shortlisted tensors (their .grad is gone).
        self.chosen_grads: dict[int, torch.Tensor] = {}
        self.deferred = deferred
        # With a rest rule: the rest step of each shortlist's coordinates, waiting for finish().
        self.deferred_steps: dict[int, torch.Tensor] = {}

    @property
    def started(self) -> bool:
        return bool(self.scores)

    @property
    def finished(self) -> bool:
        return self.chosen is not None

    def observe(self, index: int, param: torch.Tensor) -> None:
        """Score one candidate whose gradient has just been accumulated."""
        if index in self.scores and not self.closed:
            # A tensor seen before: the first backward is over and this is a later micro-batch.
            # (Closing here rather than from an end-of-backward callback keeps reentrant
            # activation checkpointing, whose inner backward passes end early, scoring everything.)
            self.close()
        if param.grad is None or index in self.pinned:
            return
        if self.closed:
            # A later micro-batch of the same step: the plan's tensors keep accumulating (the
            # coordinates and the update use the whole step's gradient), the rest are dropped.
            if index not in self.plan.members:
                self._drop(index)
            else:
                self._reduce(index, param.grad)
                if index in self.shortlists:  # accumulated at its candidates only
                    if self.deferred is not None:  # its rest already stepped: refused, with the fix
                        self.deferred.release_outside(index, self.shortlists[index].kept)
                    self.shortlists[index].add_(param.grad)
                    param.grad = None
                elif self.shortlist_held is not None and not self.shortlist_held():
                    self._shorten((index,) if index in self.plan.partial else ())
            return
        self._reduce(index, param.grad)
        score = float(self.score_fn(index, param.grad))
        if not math.isfinite(score):
            # The step will be skipped; rank the tensor last so the plan stays well defined.
            self.saw_nonfinite = True
            if self.deferred is None:
                self.nonfinite.add(index)
            # (A rest rule stepped in the hooks takes a zero step with it and frees it, as on
            # any other step: keeping every bad gradient would hold the whole model's.)
            score = -math.inf
        self.scores[index] = score
        previous = self.plan.members
        self.plan = self.packer.plan(self.scores)
        members = self.plan.members
        for dropped in previous - members - self.nonfinite:
            self._drop(dropped)
        if index not in members and index not in self.nonfinite:
            self.release(index)
        if self.shortlist_held is not None and not self.shortlist_held():
            self._shorten(self.plan.partial)
        held = sum(
            self.params[i].grad.numel() * self.params[i].grad.element_size()
            for i in members
            if self.params[i].grad is not None
        ) + sum(shortlist.nbytes for shortlist in self.shortlists.values())
        self.peak_held_bytes = max(self.peak_held_bytes, held)

    def _shorten(self, partial: Sequence[int]) -> None:
        """Reduce partly selected tensors' dense gradients to their shortlists (once each)."""
        for index in partial:
            grad = self.params[index].grad
            if index in self.shortlists or index in self.nonfinite or grad is None:
                continue
            shortlist = make_shortlist(grad, self.packer.most(index), self.packer.row_size(index))
            self.shortlists[index] = shortlist
            if self.deferred is not None:  # steps outside the shortlist and frees the gradient
                self.deferred_steps[index] = self.deferred.release_outside(index, shortlist.kept)
            else:
                self.params[index].grad = None

    def _drop(self, index: int) -> None:
        """The plan no longer wants ``index``: release its gradient, or its shortlist's step."""
        shortlist = self.shortlists.pop(index, None)
        step = self.deferred_steps.pop(index, None)
        if step is not None:
            # Its squared norm leaves the shortlists: clipping counts it with the rest's.
            self.deferred.apply_deferred(index, shortlist.kept, step, None, shortlist.squares)
        elif shortlist is None:
            self.release(index)

    def held_elsewhere(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(gradient values, squared norm of the whole gradient)`` of each shortlisted tensor.

        For clipping before the step: the whole gradient's norm counts, and the values the
        selection will pick from are scaled with the rest.
        """
        return [(s.values, s.squares) for s in self.shortlists.values()]

    def _reduce(self, index: int, grad: torch.Tensor) -> None:
        if self.average is not None:
            self.average([(index, grad)])

    def close(self) -> None:
        """The first backward is over: the ranking is fixed; freeze what the plan cannot use."""
        if self.closed or not self.started:
            return
        self.closed = True
        if self.freeze:
            self._freeze_all_but(self.plan.members | self.pinned, keep_grads=self.nonfinite)

    def finish(self) -> Coordinates:
        """Fix the selection from the step's (accumulated) gradients and freeze the rest."""
        if self.chosen is not None:
            return self.chosen
        self.close()
        grads = {
            index: self.params[index].grad
            for index in self.plan.partial
            if self.params[index].grad is not None
        }
        chosen = self.packer.coordinates(self.plan, grads)
        counts = self.packer.counts(self.plan) if self.shortlists else {}
        for index, shortlist in self.shortlists.items():
            picked = None
            if counts.get(index, 0) > 0:
                chosen[index], self.chosen_grads[index] = pick(shortlist, counts[index])
                picked = chosen[index]
            step = self.deferred_steps.pop(index, None)
            if step is not None:
                self.deferred.apply_deferred(index, shortlist.kept, step, picked)
        self.shortlists.clear()
        chosen.update((index, None) for index in self.pinned)
        self.chosen = {
            i: c
            for i, c in chosen.items()
            if self.params[i].grad is not None or i in self.chosen_grads
        }
        if self.freeze:
            self._freeze_all_but(self.chosen)
        else:
            for index, param in enumerate(self.params):
                if index not in self.chosen and param.grad is not None:
                    self.release(index)
        return self.chosen

    def _free(self, index: int) -> None:
        self.params[index].grad = None

    def _freeze_all_but(self, keep, keep_grads: set[int] = frozenset()) -> None:
        for index, param in enumerate(self.params):
            if index not in keep:
                if index not in keep_grads:
                    param.grad = None
                param.requires_grad_(False)
