"""The selection engine: which candidates Adam updates now, and when and how that changes.

:class:`BlockSelector` owns everything of a selection but the update itself: the budget and the
packer, the visit counts, the trigger, the scorer and its seeded generator, the selection in
force and the scoring pass of the next one. It switches ``requires_grad`` on the candidates and
frees the gradients a selection cannot use; the optimizer only learns which blocks left (their
Adam state goes) and which coordinates to update. Its :meth:`state_dict` is the selection half
of the optimizer's checkpoint section.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from blockllm.selection.candidates import CandidateSet
from blockllm.selection.coordinates import Selected, same, to_saved
from blockllm.selection.packing import (
    BudgetPacker,
    Coordinates,
    budget_for,
    make_selection_rule,
    tensor_cap,
)
from blockllm.selection.scorers import CyclicScorer, make_scorer
from blockllm.selection.scoring import DeferredRest, ScoringPass
from blockllm.selection.triggers import make_trigger

if TYPE_CHECKING:
    from blockllm.config import BlockLLMConfig
    from blockllm.distributed.base import Communicator

logger = logging.getLogger(__name__)


class BlockSelector:
    """Selects blocks for one optimizer.

    Args:
        candidates: the tensors that may be selected (the pinned ones are always selected).
        config: sparsity, patience and the policies (names or objects).
        comm: how scores, coordinates and the loss are agreed on with other ranks.
        release: with a state-free rule for the rest, called with a candidate whose gradient
            the selection does not use (it steps with it and frees it); every candidate then
            stays trainable. None: such gradients are freed and unselected candidates frozen.
        holding: True while the loop holds gradients for a later backward of the same step.
        deferred: the rest rule, when it steps in the hooks: shortlists then split its step
            (:class:`~blockllm.selection.scoring.ScoringPass`).

    Raises:
        ValueError: an unknown policy name, or a sparsity that leaves no budget.
    """

    def __init__(
        self,
        candidates: CandidateSet,
        config: BlockLLMConfig,
        comm: Communicator,
        release: Callable[[int], None] | None = None,
        holding: Callable[[], bool] = lambda: False,
        deferred: DeferredRest | None = None,
    ):
        self.candidates = candidates
        self.config = config
        self.comm = comm
        self.release = release
        self.holding = holding
        self.deferred = deferred
        self.trigger = make_trigger(config.trigger, config.patience)
        self.scorer = make_scorer(config.score)
        self.rule = make_selection_rule(config.selection)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.visits: list[int] = []
        self.selection: Coordinates = {}
        self.scoring: ScoringPass | None = None
        self.num_selections = 0
        self.num_reselections = 0
        self.selection_seconds = 0.0
        self.peak_selection_grad_bytes = 0
        # The gradient of the coordinates a finished scoring pass picked from shortlists.
        self.chosen_grads: dict[int, torch.Tensor] = {}
        self.refresh()

    # ------------------------------------------------------------------ budget

    def refresh(self) -> None:
        """Recompute the budget and the packer for the current candidates."""
        self.visits += [0] * (len(self.candidates) - len(self.visits))
        self.total = self.candidates.numel
        self.budget = budget_for(self.config.sparsity, self.total)
        if self.total == 0 and self.candidates.pinned:
            # Every candidate is pinned (always_adam): plain AdamW, nothing to select.
            self.packer = self.rule.packer(self.candidates.sizes, 0, None, None)
            return
        if self.total == 0:
            raise ValueError(
                "BlockLLM has no coordinates to train: every candidate tensor is empty "
                f"({len(self.candidates)} zero-size tensors)"
            )
        if self.budget < 1:
            raise ValueError(
                f"Invalid sparsity: {self.config.sparsity} leaves a budget of 0 of {self.total} "
                "coordinates; lower the sparsity"
            )
        sizes = self.candidates.sizes
        caps = None
        if self.config.max_tensor_share < 1.0:
            caps = [tensor_cap(sizes, self.budget, self.config.max_tensor_share)] * len(sizes)
        row_sizes = self.candidates.row_sizes if self.config.partial == "rows" else None
        self.packer: BudgetPacker = self.rule.packer(sizes, self.budget, caps, row_sizes)

    @property
    def selects_everything(self) -> bool:
        """Sparsity 0 (or a budget as large as the model): every block is selected for good."""
        return self.budget >= self.total

    @property
    def pending(self) -> bool:
        """True when the next backward is a selection step (every candidate takes part)."""
        return self.scoring is not None

    @property
    def num_selected(self) -> int:
        """Coordinates that may change at the next step, over all ranks."""
        pinned = self.candidates.pinned
        return sum(
            self._count(index, coordinates)
            for index, coordinates in self.selection.items()
            if index not in pinned
        )

    def _count(self, index: int, coordinates: Selected | None) -> int:
        """Coordinates of candidate ``index`` that ``coordinates`` (None: all) hold, all ranks."""
        if coordinates is None:
            return self.candidates.params[index].numel()
        return self.comm.count(coordinates)

    # ------------------------------------------------------------------ one selection

    def start(self) -> None:
        """Make every candidate trainable so the next backward scores them all."""
        params = self.candidates.params
        if self.selects_everything:
            for index, param in enumerate(params):
                if index not in self.selection:
                    self.selection[index] = None
                    param.requires_grad_(True)
            self.scoring = None
            return
        packer = self.comm.packer(self.packer, params)
        average = self.comm.average_grads_ if self.comm.syncs_gradients else None
        # Shortlists hand the picked coordinates' gradient over compacted, and under FSDP2 the
        # coordinates come from a threshold over the shards' dense gradients: neither otherwise.
        shortlist = (
            self.config.compact_grads
            and (self.release is None or self.deferred is not None)
            and not self.comm.shards_parameters
        )
        self.scoring = ScoringPass(
            params, packer, self._score, average, release=self.release,
            freeze=self.release is None, pinned=self.candidates.pinned,
            shortlist=self.holding if shortlist else None, deferred=self.deferred,
        )  # fmt: skip
        for param in params:
            param.requires_grad_(True)

    def _score(self, index: int, grad: torch.Tensor) -> float:
        if isinstance(self.scorer, CyclicScorer):
            return self.scorer.position(index, self.visits)
        value = self.scorer.score(grad, norm=self.comm.grad_norm, generator=self.generator)
        if self.config.visit_penalty:
            value /= 1 + self.visits[index]
        return value

    def observe_grad(self, index: int, param: torch.Tensor) -> None:
        """A candidate's gradient was accumulated during a selection step's backward."""
        started = time.perf_counter()
        self.scoring.observe(index, param)
        self.selection_seconds += time.perf_counter() - started

    def finish(self) -> Coordinates | None:
        """The selection the pending scoring pass arrived at; None when nothing was scored."""
        scoring = self.scoring
        if scoring is None or not scoring.started:
            return None
        started = time.perf_counter()
        chosen = scoring.finish()
        self.chosen_grads = scoring.chosen_grads
        self.selection_seconds += time.perf_counter() - started
        self.peak_selection_grad_bytes = max(
            self.peak_selection_grad_bytes, scoring.peak_held_bytes
        )
        return chosen

    @property
    def saw_nonfinite(self) -> bool:
        return self.scoring is not None and self.scoring.saw_nonfinite

    def restart_if_scored(self) -> None:
        """Scores of discarded gradients are void: score again at the next backward."""
        if self.scoring is not None and self.scoring.started:
            self.start()

    def commit(self, chosen: Coordinates, step: int) -> set[int]:
        """Make ``chosen`` the selection; returns the blocks whose Adam state must go.

        Blocks that stay (whole, or with the same coordinates) keep their state; the others
        lose it. Unselected candidates are frozen and their gradients freed.
        """
        self.scoring = None
        agreed = self.comm.staying(self.selection, chosen)
        leaving = set()
        for index, coordinates in self.selection.items():
            if agreed is not None:
                stays = index in agreed
            else:
                stays = index in chosen and same(coordinates, chosen[index])
            if not stays:
                leaving.add(index)
        for index, param in enumerate(self.candidates.params):
            if index in chosen:
                param.requires_grad_(True)
                self.visits[index] += 1
            elif self.release is None:  # with a rest rule every candidate keeps training
                param.grad = None
                param.requires_grad_(False)
        self.selection = dict(chosen)
        self.num_selections += 1
        if self.num_selections > 1:
            self.num_reselections += 1
        logger.info(
            "BlockLLM selection %d at step %d: %d tensors, %d of %d coordinates",
            self.num_selections, step, len(chosen), self.num_selected, self.budget,
        )  # fmt: skip
        if logger.isEnabledFor(logging.DEBUG):  # the summary is built only when it is shown
            logger.debug("selected (name: coordinates): %s", self._selection_summary())
        return leaving

    def _selection_summary(self) -> dict[str, int]:
        """Each selected tensor's name and how many of its coordinates Adam now holds."""
        return {
            self.candidates.names[index]: self._count(index, coordinates)
            for index, coordinates in sorted(self.selection.items())
        }

    def observe_loss(self, loss: float | None) -> None:
        """Feed the trigger one step's loss; start a selection when it fires."""
        if self.selects_everything or self.scoring is not None:
            return
        if self.trigger.observe(loss):
            self.trigger.reset()
            self.start()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The selection state: tensors and plain values only (``weights_only`` loads it)."""
        names = self.candidates.names
        rule = self.config.selection
        return {
            "selection_rule": rule if isinstance(rule, str) else type(rule).__name__,
            "selected": [names[index] for index in sorted(self.selection)],
            "coordinates": {
                names[index]: to_saved(coordinates)
                for index, coordinates in self.selection.items()
                if coordinates is not None
            },
            "visits": list(self.visits),
            "trigger": self.trigger.state_dict(),
            "selection_pending": self.scoring is not None,
            "num_selections": self.num_selections,
            "num_reselections": self.num_reselections,
            "selection_seconds": self.selection_seconds,
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, section: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s keys (names already checked against the candidates)."""
        params = self.candidates.params
        index_of = {name: index for index, name in enumerate(self.candidates.names)}
        coordinates = section["coordinates"]
        self.selection = {}
        for name in section["selected"]:
            index = index_of[name]
            saved = coordinates.get(name)
            self.selection[index] = None if saved is None else saved.to(params[index].device).clone()
        self.visits = [int(v) for v in section["visits"]]
        self.trigger.load_state_dict(section["trigger"])
        self.num_selections = int(section["num_selections"])
        self.num_reselections = int(section["num_reselections"])
        self.selection_seconds = float(section["selection_seconds"])
        # A CPU generator takes only a CPU state; loaders may have moved every tensor to a GPU.
        self.generator.set_state(section["generator_state"].cpu())
        self.scoring = None
        for index, param in enumerate(params):
            if index not in self.selection and self.release is None:
                param.grad = None
                param.requires_grad_(False)
            else:
                param.requires_grad_(True)
        if section["selection_pending"]:
            self.start()


__all__ = ["BlockSelector"]
