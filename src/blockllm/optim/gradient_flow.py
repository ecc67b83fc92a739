"""Where each gradient goes once it lands: the scoring pass, Adam's store, or the rest step.

:class:`GradientFlow` is called from every candidate's post-accumulate-grad hook and from
``step()``. On a selection step a gradient goes to the selector's scoring pass. On an ordinary
step a selected tensor's gradient stays for Adam (a partly selected one is compacted to its
selected coordinates, :mod:`blockllm.optim.compact_grads`), and, with a state-free rule for the
rest, every other candidate coordinate's gradient is stepped with and freed at once
(:mod:`blockllm.optim.rest_step`). It also hands ``step()`` the gradients Adam applies, averaged
once over data-parallel ranks, and clips them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from blockllm.config import BlockLLMConfig
from blockllm.distributed.base import Communicator
from blockllm.optim.adam_update import finite_flag, flags_all_true
from blockllm.optim.clipping import clip_selected_
from blockllm.optim.compact_grads import CompactGradients
from blockllm.optim.rest_step import RestStepper
from blockllm.selection.candidates import CandidateSet
from blockllm.selection.packing import Coordinates
from blockllm.selection.rest_rules import rest_rules_for
from blockllm.selection.selector import BlockSelector


class GradientFlow:
    """Routes one optimizer's gradients.

    Args:
        candidates: the candidate tensors.
        config: ``compact_grads`` and the rest rule's knobs.
        comm: averaging and local shards.
        groups: returns the param group of each candidate (for the rest step's lr).

    The selector is attached with :meth:`attach` (it needs :meth:`release` at construction).
    """

    def __init__(
        self,
        candidates: CandidateSet,
        config: BlockLLMConfig,
        comm: Communicator,
        groups: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.candidates = candidates
        self.comm = comm
        self.groups = groups
        self.compact = CompactGradients(config.compact_grads, comm)
        self._holding = 0
        rule, vocab_rule = rest_rules_for(config.rest, config.vocab_rest, config.factored_beta2)
        overrides = {}
        if vocab_rule is not None:
            overrides = {index: vocab_rule for index in candidates.vocabulary}
        unsharded = [
            r for r in (rule, *overrides.values())
            if hasattr(r, "init_state") and not getattr(r, "supports_shards", False)
        ]  # fmt: skip
        if unsharded and comm.shards_parameters:
            raise ValueError(
                f"Invalid rest: {unsharded[0]!r} keeps state but does not declare "
                "supports_shards = True, so it cannot see statistics that FSDP2 splits over "
                "ranks; use a built-in rule or give it a 'shards' argument "
                "(blockllm.selection.rest_rules.RestRule)"
            )
        self.rest = None if rule is None else RestStepper(
            rule, config.rest_lr_scale, config.rest_weight_decay, candidates.params, groups(),
            comm, config.rest_in_backward, self.holding, config.stochastic_rounding, config.seed,
            overrides,
        )  # fmt: skip
        self.selector: BlockSelector | None = None
        # With a rest rule, the clip's coefficient waits here for Adam's gradients (for_update):
        # the rest steps with unclipped gradients wherever it runs (see clip_).
        self._clip_coefficient: torch.Tensor | None = None
        self._clip_left: set[int] = set()

    @property
    def release(self) -> Callable[[int], None] | None:
        """What the selector calls for a gradient it cannot use: the rest step, or None (free)."""
        return None if self.rest is None else self.rest.release

    @property
    def deferred(self) -> RestStepper | None:
        """The rest rule when it steps in the hooks (shortlists can then split its step)."""
        return self.rest if self.rest is not None and self.rest.in_backward else None

    def attach(self, selector: BlockSelector) -> None:
        self.selector = selector

    def candidates_changed(self) -> None:
        if self.rest is not None:
            self.rest.groups = self.groups()

    # ------------------------------------------------------------------ during backward

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        """A candidate's gradient was accumulated (the post-accumulate-grad hook)."""
        self.comm.touched(index)
        selector = self.selector
        if selector.pending:
            if self.rest is not None and self.rest.holding:
                # A rest rule keeps every gradient while holding anyway: it is scored once the
                # step's gradient is whole (the last backward's hooks, or score_held).
                return
            selector.observe_grad(index, param)
            return
        selection = selector.selection
        if index in selection:
            coordinates = selection[index]
            if self.rest is not None and coordinates is not None:
                if self.rest.holding:
                    return  # step() steps its unselected part with this dense gradient
                self.rest.release_rest_of(index, coordinates)
            self.compact.capture(index, param, coordinates)
        elif self.rest is not None:  # only a rest rule keeps unselected tensors trainable
            self.rest.release(index)

    def score_held(self) -> None:
        """At ``step()`` of a selection step with a rest rule: score every gradient still held
        that no hook scored (all of them when the rest steps in ``step()``; with
        ``hold_gradients()``, a tensor only earlier micro-batches reached), so that the ranking
        comes from the step's whole gradient, as for one big batch."""
        selector = self.selector
        if self.rest is None or not selector.pending or selector.scoring is None:
            return
        scored = selector.scoring.scores
        for index, param in enumerate(self.candidates.params):
            if param.grad is not None and index not in scored:
                selector.observe_grad(index, param)

    def holding(self) -> bool:
        """True inside :meth:`hold`: more backward passes of this step are to come."""
        return self._holding > 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep every gradient as autograd leaves it (no rest step, no shortlist) meanwhile."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1

    # ------------------------------------------------------------------ at the step

    def clip_(
        self, max_norm: float, norm_type: float, parameters: Iterable[torch.Tensor]
    ) -> torch.Tensor:
        """Clip what the step will apply against the whole gradient's norm; see the optimizer.

        With a rest rule, a held gradient the rest will still step with (``rest_in_backward=
        False``, gradients held for accumulation, a selection step's, FSDP2's partly selected
        tensors) is left unclipped: the rest steps in the hooks see unclipped gradients, and so
        must the ones it takes in ``step()``, or the factored rule's statistics would depend on
        where the step ran. Adam's part of it is scaled by the kept coefficient in
        :meth:`for_update`. Everything else is scaled now, as torch's clip does.
        """
        selection = None if self.selector.pending else self.selector.selection
        consumed = [] if self.rest is None else self.rest.consumed_squares
        left_for_rest = set() if self.rest is None else set(self.rest.still_to_step(selection))
        if self.rest is not None and selection is not None:
            # Every coordinate's gradient is used: a held gradient counts whole unless the rest
            # step already took (and counted) its unselected part.
            selection = {i: c for i, c in selection.items() if i in self.rest.stepped}
        scoring = self.selector.scoring
        elsewhere = [] if scoring is None else scoring.held_elsewhere()
        pending = self._clip_coefficient
        total, coefficient = clip_selected_(
            max_norm, norm_type, parameters, self.candidates, selection, self.compact,
            self.comm, consumed, elsewhere, left_for_rest, pending,
        )  # fmt: skip
        if coefficient is not None and self.rest is not None:
            # Owed to the gradients left for the rest, and counted on the rest's squared norms
            # by a second clip.
            self._clip_coefficient = coefficient if pending is None else pending * coefficient
            self._clip_left = left_for_rest
        return total

    def for_update(self, selection: Coordinates) -> dict[int, torch.Tensor]:
        """The gradients Adam applies, by candidate index, averaged over ranks once.

        Steps the rest with every gradient still held first (deferred or held ones, and the
        unselected part of partly selected tensors on a selection step), then clips what of
        them Adam takes.
        """
        if self.rest is not None:
            self.rest.sweep(selection)
        coefficient, self._clip_coefficient = self._clip_coefficient, None
        if coefficient is not None:  # as clip_selected_ would have: bitwise its values for Adam
            for index in self._clip_left:
                grad = self.comm.local(self.candidates.params[index].grad)
                if grad is not None:
                    grad.mul_(coefficient.to(grad.device, grad.dtype))
        grads = self.compact.for_update(selection, self.candidates.params, self.candidates.names)
        self.comm.average_grads_(list(grads.items()))
        return grads

    def pending_finite(self) -> bool:
        """Before ``step()`` uses anything: every gradient held for it (in ``.grad`` or compacted,
        this rank's part) and every one the rest stepped with in the hooks is finite."""
        tensors = [
            self.comm.local(p.grad) for p in self.candidates.params
            if p.grad is not None and not p.grad.is_sparse
        ]  # fmt: skip
        if not self.compact.stale:
            tensors.extend(self.compact.held.values())
        scoring = self.selector.scoring
        if scoring is not None:
            tensors.extend(values for values, _ in scoring.held_elsewhere())
        return flags_all_true([finite_flag(tensors), self._rest_flag()])

    def all_finite(self, grads: dict[int, torch.Tensor]) -> bool:
        return flags_all_true([finite_flag(list(grads.values())), self._rest_flag()])

    def _rest_flag(self) -> torch.Tensor | None:
        # Both flags are read together: one wait for the device per step, not two.
        return None if self.rest is None else self.rest.finite_flag()

    def end_step(self) -> None:
        self._clip_coefficient = None
        self.compact.stale = True
        if self.rest is not None:
            self.rest.end_step()

    def clear(self) -> None:
        """Gradients were zeroed."""
        self.compact.clear()
        self.comm.forget_grads()
        self.end_step()


__all__ = ["GradientFlow"]
