"""The BlockLLM optimizer: Adam(W) on a small, gradient-selected set of parameter tensors."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from blockllm.config import DEFAULTS, BlockLLMConfig
from blockllm.distributed.base import Communicator, choose_communicator
from blockllm.errors import BlockLLMError
from blockllm.optim.adam_update import PARKED_KEYS, needs_master, update_selected_
from blockllm.optim.grad_hooks import GradHooks
from blockllm.optim.gradient_flow import GradientFlow
from blockllm.optim.inspection import SelectionViews
from blockllm.optim.params import normalize_group, normalize_param_groups
from blockllm.optim.rounding import RoundingGenerators
from blockllm.optim.state_format import (
    check_same_model,
    check_state,
    model_section,
    parked_section,
    read_section,
    restored_parked,
    restored_state,
)
from blockllm.optim.validation import check_adam_arguments
from blockllm.selection.candidates import CandidateSet
from blockllm.selection.packing import Coordinates
from blockllm.selection.selector import BlockSelector
from blockllm.selection.triggers import loss_value

logger = logging.getLogger(__name__)


class BlockLLM(SelectionViews, Optimizer):
    r"""Adam(W) on a gradient-selected subset of parameter tensors (BlockLLM, arXiv 2406.17296).

    Each parameter tensor is a block; Adam moments exist only for the selected blocks::

        k        = floor((1 - sparsity) * N)                 # N: coordinates of all candidates
        score_l  = ||G_l||_2 / (1 + times l was selected)    # visit frequency spreads the choice
        select   = whole tensors in score order while they fit into k (each capped at
                   max_tensor_share of k); the rest of k to the best rows (or |G|-largest
                   coordinates) of the first tensor that did not fit
        update   = AdamW on the selected coordinates (torch's own kernels)
        rest     = "none": every other candidate is frozen (requires_grad off: no gradient, and
                   backward stops below the lowest selected tensor), the paper's method;
                   "factored" (the default, through "auto"), "sign", "colnorm": every other
                   coordinate takes a step lr * rest_lr_scale * direction(g) that keeps no
                   per-coordinate state, in its gradient hook, which frees the gradient at
                   once (see :mod:`blockllm.optim.rest_step`)
        reselect = after >= patience losses, when loss_t >= mean(last patience losses), or
                   every patience steps (trigger="interval")

    On a selection step every candidate takes part in the user's own backward, and a
    post-accumulate-grad hook scores each gradient and frees those the selection can no longer
    use, so no full-model gradient exists. Leaving blocks lose their moments, entering ones start
    from zero, staying ones keep theirs; bf16/fp16 blocks get fp32 masters and moments for the
    selected coordinates only. With ``sparsity=0`` this is ``torch.optim.AdamW`` step for step.
    Unlike BAdam the blocks are chosen by gradient from any layer; unlike the authors' code the
    budget is used exactly and the whole selection state is checkpointed.

    The selection is made by a :class:`~blockllm.selection.selector.BlockSelector`
    (``selector``); everything said to other processes goes through a
    :class:`~blockllm.distributed.base.Communicator` (``communicator``): nothing with
    ``process_group=None``, averaging over the group otherwise (data parallel without DDP), and
    agreement over the device mesh for FSDP2 DTensor parameters, which are detected
    (``docs/distributed.md``). This class is the ``torch.optim`` shell around them.

    Args:
        params: ``model.named_parameters()``, or param groups (dicts) whose ``"params"`` come with a
            parallel ``"names"`` list. Names key the selection and checkpoints.
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8, 0.0).
        config: the selection knobs as a :class:`blockllm.config.BlockLLMConfig`; keyword
            arguments named like its fields (``sparsity=0.9``, ``patience=100``, ``rest="sign"``
            ...) override it. Every knob, its default and meaning is documented there.
        foreach, fused: torch's Adam kernels; both None picks fused on CPU and CUDA.
        process_group: a ``torch.distributed`` group for data parallelism without DDP: parameters
            are broadcast from its first rank, and the gradients BlockLLM uses and the loss are
            averaged over it, each once. None: no communication (FSDP2 is detected).

    Raises:
        ValueError, TypeError: on any invalid argument, naming it and its value.
        NoMatchingParamsError: an ``include``/``exclude``/``always_adam`` pattern matches nothing.

    Example:
        >>> opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, patience=100)
        >>> loss = model(**batch).loss
        >>> loss.backward()
        >>> opt.step(loss=loss)
        >>> opt.zero_grad(set_to_none=True)
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        config: BlockLLMConfig | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        check_adam_arguments(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused
        )
        # The knobs: a config, keyword arguments, or both (the arguments win).
        self.config = config = (config or DEFAULTS).replace(**options)
        groups, aliases = normalize_param_groups(params)
        self._candidates = candidates = CandidateSet(
            config.include, config.exclude, aliases, config.always_adam
        )
        candidates.check_patterns([name for group in groups for name in group["param_names"]])
        self._hooks = GradHooks(self, BlockLLM._on_grad_ready)
        self._constructed = False
        self.num_skipped_steps = 0
        self.num_steps = 0
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None  # with max_grad_norm: the norm step() clipped
        self._recorded_losses: list[float] = []
        # keep_moments: candidate index -> the Adam moments and step of a whole tensor away
        # from the selection, taken up again when it comes back whole.
        self._parked: dict[int, dict[str, torch.Tensor]] = {}
        # Stochastic rounding of Adam's bf16 moments (moment_dtype) and of bf16 weights stepped
        # without masters (master_weights=False), apart from the rest step's stream.
        self._moment_rounding = RoundingGenerators(config.seed + 1)
        self._warned: set[str] = set()
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach,
            fused=fused,
        )  # fmt: skip
        super().__init__(groups, defaults)  # registers the candidates (add_param_group)
        if not len(candidates):
            raise ValueError(
                "BlockLLM has no candidate tensors: every parameter is frozen or excluded "
                f"(exclude={config.exclude!r}, include={config.include!r})"
            )
        self._comm = choose_communicator(candidates.names, candidates.params, process_group)
        self._flow = GradientFlow(candidates, config, self._comm, self._groups_of_candidates)
        self._selector = BlockSelector(
            candidates, config, self._comm, self._flow.release, self._flow.holding,
            self._flow.deferred,
        )
        self._flow.attach(self._selector)
        self._constructed = True
        self._activate()
        with torch.no_grad():
            self._comm.broadcast_([p.detach() for g in self.param_groups for p in g["params"]])
        logger.info(
            "BlockLLM: %d candidate tensors, %d coordinates, budget k=%d (sparsity %.4g), "
            "%d excluded and frozen", len(candidates), self._selector.total, self.budget,
            config.sparsity, len(candidates.excluded_names),
        )  # fmt: skip
        self._selector.start()

    def record_loss(self, loss: Any) -> None:
        """Note a (micro-batch) loss for the next :meth:`step` that is called without one.

        For training loops that call ``step()`` themselves (Hugging Face Trainer, accelerate): the
        mean of the losses recorded since the last step feeds the reselection trigger.
        """
        self._recorded_losses.append(loss_value(loss))

    # ------------------------------------------------------------------ gradients

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As for torch optimizers; also restarts a selection whose step never came.

        A selection is committed by ``step()``. When gradients are zeroed before that (a
        ``GradScaler`` skipped the step after an overflow, or the loop moved on), the scores
        belong to discarded gradients: the next backward scores every candidate again.
        """
        self._selector.restart_if_scored()
        self._flow.clear()
        super().zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        parameters: Iterable[torch.Tensor] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clip the gradient this optimizer is about to apply to a total norm of ``max_norm``.

        As ``torch.nn.utils.clip_grad_norm_(params, max_norm)``, with the norm taken over what
        the update uses: whole tensors' gradients and the *selected coordinates* of partly
        selected ones, compacted (``compact_grads=True``) or not, so both modes train alike;
        bitwise torch's clip when every held gradient is whole. On a selection step the
        coordinates are not chosen yet and the held gradients count whole. ``parameters``
        (default: every parameter of the param groups) sets which ``.grad`` tensors take part,
        and the order in which they are summed. With a ``process_group`` the gradients are
        averaged first (once). Returns the total norm before clipping.

        With a rest rule the norm is the whole gradient's (the rest's part measured in the
        hooks), and the rest steps with unclipped gradients wherever it runs: a ``.grad`` it
        will still step with in ``step()`` is left as it is now, and Adam's part of it is
        scaled in ``step()``.
        """
        if parameters is None:
            parameters = [p for group in self.param_groups for p in group["params"]]
        elif isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        return self._flow.clip_(max_norm, norm_type, parameters)

    def _on_grad_ready(self, index: int, param: torch.Tensor) -> None:
        self._flow.on_ready(index, param)

    def hold_gradients(self) -> contextlib.AbstractContextManager[None]:
        """Keep this context's gradients for later: wrap all but the last backward of a step.

        BlockLLM uses gradients as they land: a state-free ``rest`` rule steps with them, and a
        selection step reduces a partly selected tensor's gradient to its candidates. Under
        gradient accumulation the earlier micro-batches' backward passes must keep theirs (in
        ``.grad``), so that the last one uses the step's whole gradient: the same as one big
        batch, selections included with a rest rule. (With a rest rule stepping in backward a
        second gradient without this is an error; with ``rest="none"`` a selection is ranked
        on the first micro-batch, and without this the candidates of a partly selected tensor
        come from it too.)
        """
        return self._flow.hold()

    def _groups_of_candidates(self) -> list[dict[str, Any]]:
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        return [group_of[id(param)] for param in self._candidates.params]

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a named param group. New tensors compete at the next step's selection."""
        group, aliases = normalize_group(param_group)
        self._candidates.aliases.update(aliases)
        super().add_param_group(group)
        self._candidates.register(group)
        if self._constructed:
            self._flow.candidates_changed()
            self._selector.refresh()
            self._activate()
            self._selector.start()

    def _activate(self) -> None:
        """Freeze excluded tensors and hook new candidates, once every check has passed."""
        self._candidates.freeze_excluded()
        for index in range(len(self._hooks), len(self._candidates)):
            if self._hooks.attach(self._candidates.params[index], index):
                self._warn_once(
                    "taken_over", "this BlockLLM took over parameters of an older one (first: "
                    "%s); the older optimizer no longer selects them", self._candidates.names[index],
                )  # fmt: skip

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Update the selected blocks, observe the loss, and maybe schedule a reselection.

        Args:
            closure: re-evaluates the model and returns the loss (as for torch.optim).
            loss: this step's loss (tensor or float), when no closure is used. The loss trigger
                needs one of the two.

        Returns:
            The closure's loss, or None.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
            if loss is None:
                loss = closure_loss
        if loss is None and self._recorded_losses:
            loss = math.fsum(self._recorded_losses) / len(self._recorded_losses)
        self._recorded_losses.clear()
        selector = self._selector
        observed = None
        if loss is not None:  # every rank's trigger must see the same loss
            observed = self._comm.average_loss(loss_value(loss), self._candidates.params[0].device)
        self.last_loss = observed
        if observed is None and selector.trigger.needs_loss and not selector.selects_everything:
            self._warn_once(
                "no_loss", "BlockLLM.step() got no loss: the loss trigger never reselects. Pass "
                "step(loss=loss) or step(closure), or use trigger='interval'.",
            )  # fmt: skip

        grads_finite = self._flow.pending_finite
        if self.config.max_grad_norm is not None:
            self.last_grad_norm = float(self.clip_grad_norm_(self.config.max_grad_norm))
            # With a rest rule the clip's norm covers every gradient the step uses (held, rows
            # compacted, and the rest's norms taken in the hooks): finite exactly when they all
            # are, so its one host read also decides the skip (on a GPU, one wait per step).
            norm_finite = math.isfinite(self.last_grad_norm)
            grads_finite = lambda: norm_finite  # noqa: E731
        if self.config.skip_nonfinite and self._flow.rest is not None:
            # The rest steps still to come (in finish() and for_update()) cannot be undone, so
            # every gradient they and Adam would use is checked before any of them is taken.
            if not self._is_finite(observed, grads_finite):
                self._flow.end_step()
                self._skip_step(discard_selection=selector.pending)
                return closure_loss
        self._flow.score_held()
        chosen = selector.finish()
        selection = chosen if chosen is not None else selector.selection
        if chosen is not None:
            self._flow.compact.deposit(selector.chosen_grads)
        grads = self._flow.for_update(selection)
        finite = (
            not self.config.skip_nonfinite
            or self._flow.rest is not None  # checked above
            or self._is_finite(observed, lambda: self._flow.all_finite(grads))
        )
        self._flow.end_step()
        if not finite:
            self._skip_step(discard_selection=chosen is not None)
            return closure_loss
        if chosen is not None:
            before = dict(selector.selection)
            for index in selector.commit(chosen, self.num_steps):
                left = self.state.pop(self._candidates.params[index], None)
                if self.config.keep_moments and left and before[index] is None:
                    # Moments only: the master is copied afresh from the weight on return,
                    # since the rest rule moves the weight while the tensor is away.
                    self._parked[index] = {key: left[key] for key in PARKED_KEYS}
            # The last tensor to leave must not keep its moments and master alive while the
            # new block's state is allocated (a partly selected head's: 12 bytes a coordinate).
            left = None
        if grads:
            self._check_selected_got_gradients(selection, grads)
        self._update(grads)
        self.num_steps += 1
        selector.observe_loss(observed)
        return closure_loss

    def _is_finite(self, observed: float | None, grads_finite: Callable[[], bool]) -> bool:
        if observed is not None and not math.isfinite(observed):
            return False
        if self._selector.saw_nonfinite:
            return False
        return self._comm.all_true(grads_finite())

    def _skip_step(self, discard_selection: bool) -> None:
        self.num_skipped_steps += 1
        if not self._warn_once(
            "skip", "BlockLLM skipped step %d: non-finite loss or gradient; parameters and "
            "optimizer state are untouched. Later skips are only counted (num_skipped_steps).",
            self.num_steps,
        ):  # fmt: skip
            logger.debug("BlockLLM skipped step %d (non-finite)", self.num_steps)
        if discard_selection:
            # The scores came from the same bad gradients: keep the old selection and score
            # again on the next backward.
            self._selector.start()

    def _check_selected_got_gradients(
        self, selection: Coordinates, grads: dict[int, torch.Tensor]
    ) -> None:
        """Warn (once) when a selected tensor had no gradient while others did.

        AdamW would skip it just as silently, but here the freezing that caused it may be
        BlockLLM's own: under reentrant activation checkpointing a layer whose inputs do not
        require grad (its frozen embedding below) gets none, so its share of the budget idles.
        """
        missing = [index for index in selection if index not in grads]
        if missing:
            names = ", ".join(self._candidates.names[index] for index in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            self._warn_once(
                "no_grad", "BlockLLM step %d: selected tensors got no gradient: %s%s; they do "
                "not train until the next selection. Causes: they were not used in the forward, "
                "or reentrant activation checkpointing whose inputs do not require grad (use "
                "use_reentrant=False, or blockllm.integrations.prepare_model_for_blockllm).",
                self.num_steps, names, more,
            )  # fmt: skip

    def _update(self, grads: dict[int, torch.Tensor]) -> None:
        update_selected_(
            self.param_groups, self.state, grads, self._selector.selection, self._candidates.index,
            self._comm.local, self.num_steps, self.config.entry_warmup, self._parked,
            getattr(torch, self.config.moment_dtype), self._moment_rounding,
            self.config.master_weights, self.config.stochastic_rounding,
        )  # fmt: skip

    def _warn_once(self, key: str, message: str, *args: Any) -> bool:
        """Log a warning the first time ``key`` comes up; False (and no log) afterwards."""
        if key in self._warned:
            return False
        self._warned.add(key)
        logger.warning(message, *args)
        return True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus a ``"blockllm"`` section with the selection state.

        Everything is a tensor or a plain Python value, so ``torch.load(weights_only=True)``
        reads it.
        """
        state_dict = super().state_dict()
        state_dict["blockllm"] = {
            **model_section(self._candidates.names, self._candidates.params, self.budget, self.sparsity),
            **self._selector.state_dict(),
            "rest": {} if self._flow.rest is None else self._flow.rest.state_dict(self._candidates.names),
            "parked": parked_section(self._parked, self._candidates.names),
            "moment_rounding": self._moment_rounding.state_dict(),
            "num_skipped_steps": self.num_skipped_steps,
            "num_steps": self.num_steps,
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, selection included, so training continues bit for bit.

        Raises:
            StateDictMismatchError: the state_dict was not saved by BlockLLM, by an unknown format
                version, or for a model with different candidate tensors.
        """
        section = read_section(state_dict)
        names, params = self._candidates.names, self._candidates.params
        check_same_model(section, names, params, self.budget, self.sparsity)
        every = [param for group in self.param_groups for param in group["params"]]
        by_id = {id(param): name for name, param in zip(names, params)}
        check_state(
            state_dict["state"], every, by_id, section, self._comm.local, self.config.master_weights
        )
        # Checked before anything changes; older checkpoints keep no moments.
        parked = restored_parked(section.get("parked", {}), names, params, self._comm.local)
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "blockllm"})
        # torch's loader puts new dicts in param_groups: the rest step must read their lr, which a
        # scheduler changes from now on, not the replaced dicts' frozen one.
        self._flow.candidates_changed()
        # Exact copies: torch's loader would cast the fp32 moments of bf16 blocks to bf16.
        self.state = restored_state(state_dict["state"], every)
        if not self.config.master_weights:
            # Saved with masters, resumed without: the bf16 weights hold the masters rounded to
            # nearest, and the masters' extra bits are dropped with them.
            for param, held in self.state.items():
                if not needs_master(self._comm.local(param), master_weights=False):
                    held.pop("master", None)
        self.num_skipped_steps = int(section["num_skipped_steps"])
        self.num_steps = int(section["num_steps"])
        self._selector.load_state_dict(section)
        self._parked = parked if self.config.keep_moments else {}
        self._moment_rounding.load_state_dict(section.get("moment_rounding", {}))
        if self._flow.rest is not None:  # older checkpoints have none: fresh generators and state
            self._flow.rest.load_state_dict(section.get("rest", {}), self._candidates.names)


__all__ = ["BlockLLM", "BlockLLMError", "Communicator"]
