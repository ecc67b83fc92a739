"""The BlockLLM optimizer: Adam(W) on a small, gradient-selected set of parameter tensors."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from blockllm.errors import BlockLLMError, StateDictMismatchError
from blockllm.optim.adam_update import UpdateBatch, gather, init_state, resolve_implementation
from blockllm.optim.distributed import GradientAverager, check_not_ddp_wrapped
from blockllm.optim.grad_hooks import GradHooks
from blockllm.optim.params import NameMatcher, Pattern, normalize_group, normalize_param_groups
from blockllm.optim.row_gradients import RowTarget, patch_module, patchable, row_target
from blockllm.optim.sharded import ShardedSync, local_view
from blockllm.optim.validation import budget_for, check_arguments
from blockllm.selection.packing import Coordinates, make_packer, tensor_cap
from blockllm.selection.scoring import ScoringPass
from blockllm.selection.triggers import make_trigger

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1

def _as_float(loss: Any) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"Invalid loss: expected a scalar, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"Invalid loss: expected a float or a scalar tensor, got {type(loss).__name__}")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity.

    One multi-tensor 2-norm per (device, dtype), the kernel ``clip_grad_norm_`` uses: NaN and
    inf survive it, and it is the cheapest full pass we measured (sums and inf-norms were several
    times slower on CPU). A norm that overflows (entries near 1e19 and up) also reads as
    non-finite; a gradient that large is not worth applying either.
    """
    if not tensors:
        return True
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_kind[(tensor.device, tensor.dtype)].append(tensor)
    device = tensors[0].device
    norms = [
        norm.float().to(device)
        for group in by_kind.values()
        for norm in torch._foreach_norm(group, 2)
    ]
    return bool(torch.isfinite(torch.stack(norms)).all())


class BlockLLM(Optimizer):
    r"""Adam(W) on a gradient-selected subset of parameter tensors (BlockLLM, arXiv 2406.17296).

    Each parameter tensor is a block. At any time only the selected blocks are trainable: they alone
    get gradients (``requires_grad`` is switched off for the others, so autograd neither computes
    nor stores their weight gradients) and they alone hold Adam moments. The selection is made
    from real gradients and renewed when the loss stops improving::

        k        = floor((1 - sparsity) * N)                 # N: coordinates of all candidates
        score_l  = ||G_l||_2 / (1 + times l was selected)    # visit frequency spreads the choice
        select   = whole tensors in score order while they fit into k; the budget left over goes
                   to the largest-|G| coordinates of the best tensor that did not fit
                   (selection="mask": the paper's |G| >= tau mask inside a score-ordered prefix)
        update   = AdamW on the selected coordinates (torch's own kernels)
        reselect = after >= patience observed losses, when loss_t >= mean(last patience losses)

    Selection gradients come from the user's own backward: on a selection step every candidate is
    trainable, and a post-accumulate-grad hook on each tensor records its norm and frees every
    gradient the selection can no longer use, so a full-model gradient never exists. Blocks that
    leave the selection lose their moments at once, blocks that enter start from zero moments,
    blocks that stay keep theirs. bf16/fp16 blocks get fp32 master copies and fp32 moments, for the
    selected coordinates only. With ``sparsity=0`` every block is always selected and the optimizer
    is ``torch.optim.AdamW`` step for step.

    Unlike BAdam (fixed block order, one layer at a time) the blocks are chosen by gradient and may
    come from any layer; unlike the authors' code the budget is always used exactly, the loss
    trigger fires on plateaus, and the whole selection state is checkpointed.

    Args:
        params: ``model.named_parameters()``, or param groups (dicts) whose ``"params"`` come with a
            parallel ``"names"`` list. Names key the selection and checkpoints.
        lr: learning rate (default: 1e-3).
        betas: Adam coefficients (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled (AdamW) weight decay (default: 0.0).
        sparsity: fraction of candidate coordinates that are *not* updated, in [0, 1) (default: 0.9).
        patience: losses observed since the last selection before the trigger may fire; with
            ``trigger="interval"``, the number of steps between selections (default: 100).
        trigger: ``"loss"`` (the paper's plateau rule) or ``"interval"`` (default: ``"loss"``).
        selection: ``"tensor"`` (whole tensors, remainder on the best leftover) or ``"mask"`` (the
            paper's coordinate mask) (default: ``"tensor"``).
        score: ``"grad_norm"``, or ``"random"`` for the ablation baseline (default: ``"grad_norm"``).
        visit_penalty: divide scores by ``1 + times selected`` (default: True).
        max_tensor_share: the largest share of the budget one tensor may take, raised
            automatically when the candidates could not use the whole budget otherwise; 1 = no
            cap (default: 0.25).
        partial: a partly selected tensor trains its ``"rows"`` with the largest gradient norm
            (the few leftover coordinates by |G|) or its largest-|G| ``"coordinates"``
            (default: ``"rows"``).
        entry_warmup: steps over which a block entering at a reselection ramps its lr up from
            ``lr / entry_warmup``; 0 = off (default: 0).
        compact_grads: gather a partly selected tensor's gradient to its selected coordinates as
            it lands and free the dense one; clip with :meth:`clip_grad_norm_` (default: False).
        include: names that may be selected: a regex (fullmatch), or a list of exact names and
            suffixes (``"lm_head.weight"``, ``".bias"``). Others are frozen. Default: all.
        exclude: names never selected and frozen, same forms; exclusion wins over inclusion.
        seed: seed of the generator behind ``score="random"`` (default: 0).
        skip_nonfinite: skip a step whose loss or gradients are NaN/inf, leaving parameters and
            state untouched; skips are counted in ``num_skipped_steps`` (default: True).
        foreach: use torch's foreach Adam kernels (default: None, see ``fused``).
        fused: use torch's fused Adam kernel; ``None`` with ``foreach=None`` picks fused on CPU and
            CUDA (default: None).
        process_group: a ``torch.distributed`` process group for data parallelism without DDP:
            parameters are broadcast from the group's first rank at construction, the selected
            gradients (every candidate's on a selection step) and the loss are averaged over
            the group, so all ranks select the same blocks and stay identical. ``None`` (default):
            no communication, unless the parameters are FSDP2 DTensors (below).

    FSDP2 (``fully_shard``) needs no argument: DTensor parameters are detected. FSDP averages the
    gradients itself; BlockLLM scores each tensor by its full gradient's norm (reduced from the
    shards over the parameters' device mesh), picks a partly selected tensor's coordinates with
    one global threshold, averages the trigger's loss over the mesh, and updates the local
    shards. Moments, masters and coordinate lists (``coordinates()`` returns flat indices into
    this rank's shard) are local, and ``memory_report()`` counts this rank's bytes. Save and
    resume with :mod:`blockllm.integrations.fsdp` (``torch.distributed.checkpoint``).

    Raises:
        ValueError, TypeError: on any invalid argument, naming it and its value.
        NoMatchingParamsError: an ``include``/``exclude`` pattern matches no parameter.

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
        sparsity: float = 0.9,
        patience: int = 100,
        trigger: str = "loss",
        selection: str = "tensor",
        score: str = "grad_norm",
        visit_penalty: bool = True,
        max_tensor_share: float = 0.25,
        partial: str = "rows",
        entry_warmup: int = 0,
        include: Pattern = None,
        exclude: Pattern = None,
        seed: int = 0,
        skip_nonfinite: bool = True,
        compact_grads: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        process_group: Any = None,
    ) -> None:
        check_arguments(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sparsity=sparsity,
            patience=patience, trigger=trigger, selection=selection, score=score,
            visit_penalty=visit_penalty, seed=seed, foreach=foreach, fused=fused,
            max_tensor_share=max_tensor_share, partial=partial, entry_warmup=entry_warmup,
        )  # fmt: skip
        groups, aliases = normalize_param_groups(params)
        self._include = NameMatcher("include", include)
        self._exclude = NameMatcher("exclude", exclude)
        every_name = [name for group in groups for name in group["param_names"]]
        every_name += [alias for names in aliases.values() for alias in names]
        for matcher in (self._include, self._exclude):
            if matcher.active:
                matcher.check_all_used(every_name)

        self.sparsity = float(sparsity)
        self.patience = int(patience)
        self.trigger = trigger
        self.selection_rule = selection
        self.score = score
        self.visit_penalty = visit_penalty
        self.max_tensor_share = float(max_tensor_share)
        self.partial = partial
        self.entry_warmup = int(entry_warmup)
        self.skip_nonfinite = skip_nonfinite
        if not isinstance(compact_grads, bool):
            raise TypeError(f"Invalid compact_grads: expected a bool, got {compact_grads!r}")
        self.compact_grads = compact_grads
        # compact_grads: candidate index -> the selected coordinates' gradient, gathered out of
        # the dense .grad of a partly selected tensor (which is then freed) as it lands.
        self._compact: dict[int, torch.Tensor] = {}
        # use_row_gradients: candidate index -> (the coordinates it was built for, its target).
        self._row_targets: dict[int, tuple[torch.Tensor, RowTarget | None]] = {}
        self._aliases = aliases
        self._candidates: list[torch.Tensor] = []
        self._candidate_names: list[str] = []
        self._candidate_index: dict[int, int] = {}
        self._excluded_names: list[str] = []
        self._excluded: list[tuple[str, torch.Tensor]] = []
        self._visits: list[int] = []
        self._selection: Coordinates = {}
        self._scoring: ScoringPass | None = None
        self._trigger = make_trigger(trigger, self.patience)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._hooks = GradHooks(self, BlockLLM._on_grad_ready)
        self._recorded_losses: list[float] = []
        self._warned_no_loss = False
        self._warned_skip = False
        self._warned_taken_over = False
        self._constructed = False
        self.num_selections = 0
        self.num_reselections = 0
        self.num_skipped_steps = 0
        self.num_steps = 0
        self.selection_seconds = 0.0
        self.peak_selection_grad_bytes = 0

        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach,
            fused=fused,
        )  # fmt: skip
        super().__init__(groups, defaults)
        self._constructed = True
        if not self._candidates:
            raise ValueError(
                "BlockLLM has no candidate tensors: every parameter is frozen or excluded "
                f"(exclude={exclude!r}, include={include!r})"
            )
        self._refresh_budget()
        check_not_ddp_wrapped(self._candidate_names, process_group)
        # FSDP2: DTensor parameters are detected; see optim/sharded.py for what is agreed on.
        self._sharded = ShardedSync.detect(self._candidate_names, self._candidates, process_group)
        self._averager = None if process_group is None else GradientAverager(process_group)
        self._activate()
        if self._averager is not None:
            with torch.no_grad():
                self._averager.broadcast_(
                    [p.detach() for group in self.param_groups for p in group["params"]]
                )
        logger.info(
            "BlockLLM: %d candidate tensors, %d coordinates, budget k=%d (sparsity %.4g), "
            "%d excluded and frozen",
            len(self._candidates), self._total, self._budget, self.sparsity,
            len(self._excluded_names),
        )  # fmt: skip
        self._start_selection()

    # ------------------------------------------------------------------ public read-only views

    @property
    def budget(self) -> int:
        """k: the most coordinates that may change in one step."""
        return self._budget

    @property
    def process_group(self) -> Any:
        """The process group gradients are averaged over, or None (no communication)."""
        return None if self._averager is None else self._averager.group

    @property
    def num_coordinates(self) -> int:
        """N: coordinates of all candidate tensors."""
        return self._total

    @property
    def num_candidates(self) -> int:
        return len(self._candidates)

    @property
    def candidate_names(self) -> list[str]:
        return list(self._candidate_names)

    @property
    def selected(self) -> list[str]:
        """Names of the tensors selected now (in candidate order)."""
        return [self._candidate_names[index] for index in sorted(self._selection)]

    @property
    def num_selected(self) -> int:
        """Coordinates that may change at the next step (never more than ``budget``)."""
        # FSDP2: a rank holds only its shard's coordinates; count those of all ranks.
        count = torch.Tensor.numel if self._sharded is None else self._sharded.global_count
        return sum(
            self._candidates[index].numel() if coordinates is None else count(coordinates)
            for index, coordinates in self._selection.items()
        )

    @property
    def visit_counts(self) -> dict[str, int]:
        return dict(zip(self._candidate_names, self._visits))

    @property
    def selection_pending(self) -> bool:
        """True when the next backward is a selection step (every candidate takes part)."""
        return self._scoring is not None

    @property
    def trainable_fraction(self) -> float:
        """Selected coordinates over all candidate coordinates."""
        return self.num_selected / self._total

    def record_loss(self, loss: Any) -> None:
        """Note a (micro-batch) loss for the next :meth:`step` that is called without one.

        For training loops that call ``step()`` themselves (Hugging Face Trainer, accelerate): the
        mean of the losses recorded since the last step feeds the reselection trigger.
        """
        self._recorded_losses.append(_as_float(loss))

    def coordinates(self, name: str) -> torch.Tensor | None:
        """Flat indices of the selected coordinates of ``name``; ``None`` when it is whole."""
        index = self._candidate_names.index(name)
        if index not in self._selection:
            raise KeyError(f"{name!r} is not selected now")
        return self._selection[index]

    def memory_report(self) -> dict[str, int]:
        """Bytes held now, by category, counted from the tensors that exist.

        ``params``: every parameter in the param groups; ``grads``: their ``.grad`` tensors;
        ``optimizer_state``: Adam moments, step counters and coordinate lists; ``master_weights``:
        fp32 copies of low-precision blocks.
        """
        report = {"params": 0, "grads": 0, "optimizer_state": 0, "master_weights": 0}
        for group in self.param_groups:
            for param in group["params"]:
                # FSDP2: this rank's shards, the memory it holds (DTensor.numel() is global).
                param, grad = local_view(param), local_view(param.grad)
                report["params"] += param.numel() * param.element_size()
                if grad is not None:
                    report["grads"] += grad.numel() * grad.element_size()
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    category = "master_weights" if key == "master" else "optimizer_state"
                    report[category] += value.numel() * value.element_size()
        for coordinates in self._selection.values():
            if coordinates is not None:
                report["optimizer_state"] += coordinates.numel() * coordinates.element_size()
        for grad in self._compact.values():
            report["grads"] += grad.numel() * grad.element_size()
        return report

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As for torch optimizers; also restarts a selection whose step never came.

        A selection is committed by ``step()``. When gradients are zeroed before that (a
        ``GradScaler`` skipped the step after an overflow, or the loop moved on), the scores
        belong to discarded gradients: the next backward scores every candidate again.
        """
        if self._scoring is not None and self._scoring.started:
            self._start_selection()
        self._compact.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, parameters: Any = None
    ) -> torch.Tensor:
        """Clip the gradient this optimizer is about to apply to a total norm of ``max_norm``.

        As ``torch.nn.utils.clip_grad_norm_(params, max_norm)``, with the norm taken over what
        the update uses: whole tensors' gradients and the *selected coordinates* of partly
        selected ones, compacted (``compact_grads=True``) or not, so both modes train alike.
        ``clip_grad_norm_(model.parameters())`` cannot see compacted gradients; call this one
        when compacting. On a selection step the coordinates are not chosen yet and the held
        gradients count whole. ``parameters`` (default: every parameter of the param groups)
        sets which ``.grad`` tensors take part, and the order in which they are summed: the
        model's order gives torch's own norm to the last bit. Returns the total norm before
        clipping.
        """
        grads: list[torch.Tensor] = []
        measured: list[torch.Tensor] = []
        if parameters is None:
            parameters = [p for group in self.param_groups for p in group["params"]]
        elif isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for param in parameters:
            grad = local_view(param.grad)
            if grad is None:
                continue
            grads.append(grad)
            index = self._candidate_index.get(id(param))
            coordinates = None if self._scoring is not None else self._selection.get(index)
            measured.append(grad if coordinates is None else gather(grad, coordinates))
        if self._averager is not None and self._compact:
            # Data parallel: clip the whole batch's gradient, as the loop does for .grad.
            self._averager.average_(list(self._compact.values()))
        grads += self._compact.values()
        measured += self._compact.values()
        if not grads:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(measured, norm_type)
        coefficient = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.device, grad.dtype))
        return total

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a named param group. New tensors compete at the next step's selection."""
        group, aliases = normalize_group(param_group)
        self._aliases.update(aliases)
        super().add_param_group(group)
        self._register_candidates(group)
        if self._constructed:
            self._refresh_budget()
            self._activate()
            self._start_selection()

    def _register_candidates(self, group: dict[str, Any]) -> None:
        for name, param in zip(group["param_names"], group["params"]):
            if not param.requires_grad:
                continue  # frozen by the user: never a candidate, never touched
            names = [name, *self._aliases.get(name, [])]
            excluded = self._exclude.matches(names)
            if self._include.active and not self._include.matches(names):
                excluded = True
            if excluded:
                self._excluded.append((name, param))
                continue
            if param.is_complex():
                raise TypeError(
                    f"Invalid params: {name!r} is complex ({param.dtype}); BlockLLM supports real "
                    "floating-point parameters only"
                )
            index = len(self._candidates)
            self._candidates.append(param)
            self._candidate_names.append(name)
            self._candidate_index[id(param)] = index
            self._visits.append(0)

    def _activate(self) -> None:
        """Freeze excluded tensors and hook new candidates, once every check has passed.

        Nothing of the model is touched before that, so a constructor that raises leaves the
        model exactly as it was (a corrected second call then sees the same trainable tensors).
        """
        for name, param in self._excluded:
            param.requires_grad_(False)
            self._excluded_names.append(name)
        self._excluded.clear()
        for index in range(len(self._hooks), len(self._candidates)):
            self._claim_hook(self._candidates[index], index)

    def _claim_hook(self, param: torch.Tensor, index: int) -> None:
        if self._hooks.attach(param, index) and not self._warned_taken_over:
            self._warned_taken_over = True
            logger.warning(
                "this BlockLLM took over parameters of an older one (first: %s); the older "
                "optimizer no longer selects them",
                self._candidate_names[index],
            )

    def _refresh_budget(self) -> None:
        self._total = sum(param.numel() for param in self._candidates)
        self._budget = budget_for(self.sparsity, self._total)
        if self._total == 0:
            raise ValueError(
                "BlockLLM has no coordinates to train: every candidate tensor is empty "
                f"({len(self._candidates)} zero-size tensors)"
            )
        if self._budget < 1:
            raise ValueError(
                f"Invalid sparsity: {self.sparsity} leaves a budget of 0 of {self._total} "
                "coordinates; lower the sparsity"
            )
        sizes = [param.numel() for param in self._candidates]
        caps = None
        if self.max_tensor_share < 1.0:
            caps = [tensor_cap(sizes, self._budget, self.max_tensor_share)] * len(sizes)
        row_sizes = None
        if self.partial == "rows":
            row_sizes = [
                param.numel() // param.shape[0] if param.ndim >= 2 and param.shape[0] else 1
                for param in self._candidates
            ]
        self._packer = make_packer(self.selection_rule, sizes, self._budget, caps, row_sizes)

    @property
    def _selects_everything(self) -> bool:
        return self._budget >= self._total

    def _start_selection(self) -> None:
        """Make every candidate trainable so the next backward scores them all."""
        if self._selects_everything:
            # sparsity 0: every block is selected for good, exactly AdamW.
            for index, param in enumerate(self._candidates):
                if index not in self._selection:
                    self._selection[index] = None
                    param.requires_grad_(True)
            self._scoring = None
            return
        reduce_fn = None
        if self._averager is not None:
            averager = self._averager

            def reduce_fn(grad: torch.Tensor) -> None:
                averager.average_([grad])

        packer = self._packer
        if self._sharded is not None:
            packer = self._sharded.packer(packer, self._candidates)
        self._scoring = ScoringPass(self._candidates, packer, self._score_block, reduce_fn)
        for param in self._candidates:
            param.requires_grad_(True)

    # ------------------------------------------------------------------ selection from hooks

    def _score_block(self, index: int, grad: torch.Tensor) -> float:
        if self.score == "random":
            value = float(torch.rand((), generator=self._generator))
        elif self._sharded is not None:
            value = self._sharded.grad_norm(grad)  # FSDP2: the full gradient's norm, from shards
        else:
            # Low-precision gradients are reduced in fp32; fp32/fp64 ones in their own dtype.
            low = grad.dtype in (torch.bfloat16, torch.float16)
            value = float(torch.linalg.vector_norm(grad, dtype=torch.float32 if low else None))
        if self.visit_penalty:
            value /= 1 + self._visits[index]
        return value

    def _on_grad_ready(self, index: int, param: torch.Tensor) -> None:
        scoring = self._scoring
        if scoring is None:
            if self.compact_grads:
                self._compact_grad(index, param)
            return
        started = time.perf_counter()
        scoring.observe(index, param)
        self.selection_seconds += time.perf_counter() - started

    def use_row_gradients(self, model: torch.nn.Module) -> list[str]:
        """Compute only the selected rows' weight gradient of partly selected vocabulary matrices.

        Patches the forward of every plain ``nn.Linear``/``nn.Embedding`` of ``model`` whose
        weight is a candidate (see :mod:`blockllm.optim.row_gradients`): on ordinary steps a
        partly selected output head then costs a matrix product over its selected rows instead
        of all of them, and no dense gradient of it (or of the embedding) is ever built. Selection
        steps, and weights selected whole or not at all, keep autograd's own backward. The
        gradients go where ``compact_grads`` puts them, so it needs ``compact_grads=True`` (clip
        with :meth:`clip_grad_norm_`). FSDP2 parameters are left alone.

        Returns:
            The names of the patched modules.
        """
        if not self.compact_grads:
            raise ValueError(
                "use_row_gradients() needs compact_grads=True: the row gradients are kept "
                "compacted, outside .grad"
            )
        if self._sharded is not None:
            return []
        patched = []
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(weight, torch.Tensor)
                and id(weight) in self._candidate_index
                and weight.ndim == 2
                and patchable(module)
            ):
                patch_module(module, self)
                patched.append(name)
        logger.info("BlockLLM: row gradients for %s", ", ".join(patched) or "no module")
        return patched

    def row_target(self, weight: torch.Tensor) -> RowTarget | None:
        """The rows whose gradient ``weight`` needs now; None for autograd's whole gradient."""
        index = self._candidate_index.get(id(weight))
        if index is None or self._scoring is not None:
            return None  # not ours, or a selection step: every gradient is scored whole
        coordinates = self._selection.get(index)
        if coordinates is None:
            return None  # selected whole, or not selected
        cached = self._row_targets.get(index)
        if cached is not None and cached[0] is coordinates:
            return cached[1]
        target: RowTarget | None = row_target(coordinates, weight.shape)
        if 2 * target.rows.numel() > weight.shape[0]:
            target = None  # coordinates spread over most rows: the whole product is cheaper
        self._row_targets[index] = (coordinates, target)
        return target

    def add_compact_grad(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` (the selected coordinates' gradient of ``weight``) to what step() uses."""
        self._add_compact(self._candidate_index[id(weight)], grad)

    def _add_compact(self, index: int, part: torch.Tensor) -> None:
        # Accumulation adds each micro-batch's part to what the step will use.
        held = self._compact.get(index)
        self._compact[index] = part if held is None else held.add_(part)

    def _compact_grad(self, index: int, param: torch.Tensor) -> None:
        """Keep only the selected coordinates of a partly selected tensor's gradient.

        Autograd produces the dense gradient; holding it until ``step()`` would cost the whole
        tensor (an embedding, an output head) for the sake of a few of its rows. Accumulation
        adds each micro-batch's gathered part.
        """
        coordinates = self._selection.get(index)
        grad = local_view(param.grad)
        if coordinates is None or grad is None or grad.is_sparse:
            return
        self._add_compact(index, gather(grad, coordinates))
        param.grad = None

    def _commit(self, chosen: Coordinates) -> None:
        """Make ``chosen`` the selection: free leaving blocks' state, keep staying blocks'."""
        # FSDP2: a partly selected tensor keeps its moments only if no shard's coordinates changed.
        agreed = None if self._sharded is None else self._sharded.staying(self._selection, chosen)
        for index, coordinates in self._selection.items():
            if agreed is not None:
                stays = index in agreed
            else:
                stays = index in chosen and _same_coordinates(coordinates, chosen[index])
            if not stays:
                self.state.pop(self._candidates[index], None)
        for index, param in enumerate(self._candidates):
            if index in chosen:
                param.requires_grad_(True)
                self._visits[index] += 1
            else:
                param.grad = None
                param.requires_grad_(False)
        self._selection = dict(chosen)
        self.num_selections += 1
        if self.num_selections > 1:
            self.num_reselections += 1
        logger.info(
            "BlockLLM selection %d at step %d: %d tensors, %d of %d coordinates",
            self.num_selections, self.num_steps, len(chosen), self.num_selected, self._budget,
        )  # fmt: skip
        logger.debug("selected: %s", self.selected)

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
        observed = None if loss is None else _as_float(loss)
        if observed is not None and self._averager is not None:
            # Every rank must see the same loss, or their triggers would disagree.
            observed = self._averager.average_scalar(observed, self._candidates[0].device)
        if observed is not None and self._sharded is not None:
            observed = self._sharded.average_scalar(observed)
        if (
            observed is None
            and self._trigger.needs_loss
            and not self._selects_everything
            and not self._warned_no_loss
        ):
            self._warned_no_loss = True
            logger.warning(
                "BlockLLM.step() got no loss: the loss trigger never reselects. Pass "
                "step(loss=loss) or step(closure), or use trigger='interval'."
            )

        scoring = self._scoring
        chosen: Coordinates | None = None
        if scoring is not None and scoring.started:
            started = time.perf_counter()
            chosen = scoring.finish()
            self.selection_seconds += time.perf_counter() - started
            self.peak_selection_grad_bytes = max(
                self.peak_selection_grad_bytes, scoring.peak_held_bytes
            )
        selection = chosen if chosen is not None else self._selection

        grads = self._gather_grads(selection)
        if self._averager is not None:
            done = scoring.reduced if chosen is not None else set()
            self._averager.average_([g for i, g in grads.items() if i not in done])
        if self.skip_nonfinite and not self._is_finite(observed, scoring, grads):
            self._skip_step(discard_selection=chosen is not None)
            return closure_loss

        if chosen is not None:
            self._scoring = None
            self._commit(chosen)
        self._update(grads)
        self.num_steps += 1
        if not self._selects_everything and self._scoring is None:
            if self._trigger.observe(observed):
                self._trigger.reset()
                self._start_selection()
        return closure_loss

    def _gather_grads(self, selection: Coordinates) -> dict[int, torch.Tensor]:
        """The gradient each selected block is updated with: whole, or its selected coordinates."""
        grads: dict[int, torch.Tensor] = {}
        for index, coordinates in selection.items():
            # FSDP2: the local shard; its coordinates are local to the shard too.
            grad = local_view(self._candidates[index].grad)
            if index in self._compact and coordinates is not None:
                if grad is not None:  # a backward after the hooks compacted: add it in
                    self._add_compact(index, gather(grad, coordinates))
                    self._candidates[index].grad = None
                grads[index] = self._compact[index]
                continue
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "BlockLLM does not support sparse gradients (nn.Embedding(sparse=True)); "
                    f"{self._candidate_names[index]!r} has one"
                )
            if coordinates is None:
                grads[index] = grad
            elif self.compact_grads:
                # A selection step: the coordinates were just chosen from the dense gradient,
                # which is not needed any more.
                grads[index] = self._compact[index] = gather(grad, coordinates)
                self._candidates[index].grad = None
            else:
                grads[index] = gather(grad, coordinates)
        return grads

    def _is_finite(
        self,
        observed: float | None,
        scoring: ScoringPass | None,
        grads: dict[int, torch.Tensor],
    ) -> bool:
        if observed is not None and not math.isfinite(observed):
            return False
        if scoring is not None and scoring.saw_nonfinite:
            return False
        finite = _all_finite(list(grads.values()))
        # FSDP2: each rank checked its shards; skipping must be unanimous.
        return finite if self._sharded is None else self._sharded.all_true(finite)

    def _skip_step(self, discard_selection: bool) -> None:
        self.num_skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            logger.warning(
                "BlockLLM skipped step %d: non-finite loss or gradient; parameters and optimizer "
                "state are untouched. Later skips are only counted (num_skipped_steps).",
                self.num_steps,
            )
        else:
            logger.debug("BlockLLM skipped step %d (non-finite)", self.num_steps)
        if discard_selection:
            # The scores came from the same bad gradients: keep the old selection and score
            # again on the next backward.
            self._start_selection()

    def _update(self, grads: dict[int, torch.Tensor]) -> None:
        for group in self.param_groups:
            # Blocks still in their entry warmup run in batches of their own, at a scaled lr.
            batches: dict[float, UpdateBatch] = defaultdict(UpdateBatch)
            for param in group["params"]:
                index = self._candidate_index.get(id(param))
                if index is None or index not in grads:
                    continue
                coordinates = self._selection[index]
                state = self.state[param]
                if not state:
                    fused, _ = resolve_implementation(group, [param])
                    state.update(init_state(local_view(param), coordinates, fused))
                batches[self._warmup_factor(state)].add(
                    local_view(param), coordinates, grads[index], state
                )
            for factor, batch in batches.items():
                batch.run(group if factor == 1.0 else {**group, "lr": group["lr"] * factor})

    def _warmup_factor(self, state: dict[str, Any]) -> float:
        """The lr multiplier of a block that entered the selection ``step`` updates ago.

        A block enters with zero moments, so Adam's first updates are about ``lr * sign(g)``
        per coordinate, several times larger than its steady-state steps; a short linear ramp
        keeps a reselection from kicking the loss up.
        """
        if self.entry_warmup <= 0:
            return 1.0
        done = int(state["step"])
        if done >= self.num_steps:
            # In since the first update: the learning-rate schedule's own warmup covers it.
            return 1.0
        return min(1.0, (done + 1) / self.entry_warmup)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus a ``"blockllm"`` section with the selection state.

        Everything is a tensor or a plain Python value, so ``torch.load(weights_only=True)`` reads it.
        """
        state_dict = super().state_dict()
        names = self._candidate_names
        state_dict["blockllm"] = {
            "format_version": STATE_FORMAT_VERSION,
            "candidates": list(names),
            "numels": [param.numel() for param in self._candidates],
            "sparsity": self.sparsity,
            "budget": self._budget,
            "selection_rule": self.selection_rule,
            "selected": [names[index] for index in sorted(self._selection)],
            "coordinates": {
                names[index]: coordinates.detach().cpu().clone()
                for index, coordinates in self._selection.items()
                if coordinates is not None
            },
            "visits": list(self._visits),
            "trigger": self._trigger.state_dict(),
            "selection_pending": self._scoring is not None,
            "num_selections": self.num_selections,
            "num_reselections": self.num_reselections,
            "num_skipped_steps": self.num_skipped_steps,
            "num_steps": self.num_steps,
            "selection_seconds": self.selection_seconds,
            "generator_state": self._generator.get_state(),
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, selection included, so training continues bit for bit.

        Raises:
            StateDictMismatchError: the state_dict was not saved by BlockLLM, by an unknown format
                version, or for a model with different candidate tensors.
        """
        section = state_dict.get("blockllm") if isinstance(state_dict, dict) else None
        if section is None:
            raise StateDictMismatchError(
                "Invalid state_dict: it has no 'blockllm' section, so it was not saved by BlockLLM"
            )
        version = section.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise StateDictMismatchError(
                f"Invalid state_dict: format_version {version!r} cannot be read by this blockllm "
                f"(it reads format_version {STATE_FORMAT_VERSION})"
            )
        self._check_same_model(section)

        saved_state = state_dict["state"]
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "blockllm"})
        # torch casts floating state to the parameter's dtype, which would turn the fp32 moments
        # and master copies of bf16 blocks into bf16. Restore exact copies instead.
        params = [param for group in self.param_groups for param in group["params"]]
        self.state = defaultdict(dict)
        for key, saved in saved_state.items():
            param = params[int(key)]
            self.state[param] = {
                name: _restore_tensor(name, value, param) for name, value in saved.items()
            }

        index_of = {name: index for index, name in enumerate(self._candidate_names)}
        coordinates = section["coordinates"]
        self._selection = {}
        for name in section["selected"]:
            index = index_of[name]
            saved_coordinates = coordinates.get(name)
            self._selection[index] = (
                None
                if saved_coordinates is None
                else saved_coordinates.to(self._candidates[index].device).clone()
            )
        self._visits = [int(v) for v in section["visits"]]
        self._trigger.load_state_dict(section["trigger"])
        self.num_selections = int(section["num_selections"])
        self.num_reselections = int(section["num_reselections"])
        self.num_skipped_steps = int(section["num_skipped_steps"])
        self.num_steps = int(section["num_steps"])
        self.selection_seconds = float(section["selection_seconds"])
        # A CPU generator takes only a CPU state; loaders may have moved every tensor to a GPU.
        self._generator.set_state(section["generator_state"].cpu())
        self._scoring = None
        for index, param in enumerate(self._candidates):
            param.requires_grad_(index in self._selection)
            if index not in self._selection:
                param.grad = None
        if section["selection_pending"]:
            self._start_selection()

    def _check_same_model(self, section: dict[str, Any]) -> None:
        saved = list(section["candidates"])
        if saved != self._candidate_names:
            missing = [n for n in self._candidate_names if n not in set(saved)]
            unexpected = [n for n in saved if n not in set(self._candidate_names)]
            detail = f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            if not missing and not unexpected:
                detail = "same names in a different order"
            raise StateDictMismatchError(
                f"Invalid state_dict: it is from a different model ({detail})"
            )
        for name, saved_numel, param in zip(saved, section["numels"], self._candidates):
            if int(saved_numel) != param.numel():
                raise StateDictMismatchError(
                    f"Invalid state_dict: it is from a different model ({name!r} has "
                    f"{saved_numel} elements there, {param.numel()} here)"
                )
        if section["budget"] != self._budget:
            raise StateDictMismatchError(
                f"Invalid state_dict: it was saved with budget {section['budget']} "
                f"(sparsity {section['sparsity']}), this optimizer has {self._budget} "
                f"(sparsity {self.sparsity})"
            )


def _same_coordinates(old: torch.Tensor | None, new: torch.Tensor | None) -> bool:
    if old is None or new is None:
        return old is None and new is None
    return old.shape == new.shape and bool(torch.equal(old, new))


def _restore_tensor(key: str, value: Any, param: torch.Tensor) -> Any:
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if key == "step":
        return value.clone()
    return value.to(device=param.device).clone()


__all__ = ["BlockLLM", "BlockLLMError"]
