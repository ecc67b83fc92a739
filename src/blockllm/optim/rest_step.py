"""The state-free step of "the rest": candidate coordinates that Adam does not update this step.

:class:`RestStepper` moves every such coordinate once per optimizer step, by the rule of
:mod:`blockllm.selection.rest_rules`, and frees the gradient it used. By default it runs inside the
gradient hooks, as each tensor's gradient lands (BREAD's trick), so at any moment at most one
unselected tensor's gradient exists besides the selected block's: no full-model gradient is ever
held, and the backward itself is the only pass over the weights.

When a step's gradient arrives in several backward passes (gradient accumulation), a tensor's
gradient is complete only after the last one: wrap the other backward passes in
``optimizer.hold_gradients()`` (their gradients are then kept, in ``.grad``, and stepped with in
the last backward or in ``step()``), or build the optimizer with ``rest_in_backward=False``
(everything is stepped in ``step()``; the cost is a full gradient held, as for AdamW).

Gradient clipping: the rest steps with the unclipped gradient, in the hooks (where no clip can
be known yet) and in ``step()`` alike, so that where it runs does not change the training (the
factored rule's running statistics would see two scales otherwise). What clipping needs from
the rest is its gradient norm, which is measured here before the gradient is freed;
``BlockLLM.clip_grad_norm_`` adds it to the norm of the gradients still held, so the total is
the norm of the whole gradient, as ``torch.nn.utils.clip_grad_norm_`` over all parameters would
compute it (up to summation order), and the coefficient scales Adam's part exactly as it would.

Non-finite gradients: a tensor whose gradient holds NaN/inf takes no rest step, and the
optimizer skips the step's Adam update; rest steps taken earlier in that backward stay taken.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from blockllm.distributed.base import Communicator
from blockllm.optim.rounding import RoundingGenerators, stochastic_round_to_bf16
from blockllm.selection.coordinates import (
    RowCoordinates,
    Selected,
    as_flat,
    fill_,
    gather,
    scatter_,
)
from blockllm.selection.packing import Coordinates
from blockllm.selection.rest_rules import FactoredStep, RestRule, SignRest
from blockllm.selection.scorers import squared_norm


def _zero_unless_finite(update: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``update``, zeroed in place when its gradient was not finite (a zero step). Sync-free on
    an accelerator (a masked fill rather than a branch on the host, which would wait for the
    device); on a CPU reading the flag costs nothing and saves a pass over the tensor."""
    if update.device.type != "cpu":
        return update.masked_fill_(~finite, 0.0)
    return update if bool(finite) else update.zero_()


# Elements per slice of the sign step on a CPU: a slice of the gradient and of the weight
# (2 x 1 MB in fp32) stay in cache between the sign and the add. Tensors up to one slice (all
# of a small model's) keep two operations: every extra operation costs a thread barrier, which
# is dear when other processes share the cores.
_SIGN_SLICE_ELEMENTS = 1 << 18


def _sign_step_(weight: torch.Tensor, grad: torch.Tensor, finite: torch.Tensor, alpha: float) -> None:
    """``weight += alpha * sign(grad)``, taking the sign in place on ``grad`` (which the caller
    frees). On a CPU slice by slice, so that each slice's sign is read back from cache rather
    than from memory: the same elementwise arithmetic, one pass over the gradient fewer."""
    if weight.device.type != "cpu" or not (grad.is_contiguous() and weight.is_contiguous()):
        weight.add_(_zero_unless_finite(grad.sign_(), finite), alpha=alpha)
        return
    if not bool(finite):
        return
    for grads, weights in zip(
        grad.view(-1).split(_SIGN_SLICE_ELEMENTS), weight.view(-1).split(_SIGN_SLICE_ELEMENTS)
    ):
        weights.add_(grads.sign_(), alpha=alpha)


# Elements per slice of the final write of a dense rest step (:func:`_subtract_in_slices_`):
# the bf16 rounding's fp32 temporaries (the widened weight, the difference, the random bits,
# their sum) are about 16 bytes an element, so 16 MB a slice rather than 16 bytes for every
# element of the largest matrix (an 8B Llama's 525M-entry embedding: 8 GB) at the backward's
# peak; large enough that an accelerator pays a few kernel launches per matrix.
_WRITE_SLICE_ELEMENTS = 1 << 20


def _subtract_in_slices_(
    weight: torch.Tensor, update: torch.Tensor, generator: torch.Generator | None
) -> None:
    """``weight -= update`` (``update`` in at least fp32), rounded stochastically to bf16 with
    ``generator``, else to the weight's dtype: slice by slice over both as flat tensors, so the
    rounding's temporaries stay slice-sized. The arithmetic per element is the whole tensor's,
    and so are the random bits on a CPU (its generator draws one stream however it is cut)."""
    if weight.is_contiguous() and update.is_contiguous():
        pairs = zip(
            weight.view(-1).split(_WRITE_SLICE_ELEMENTS), update.view(-1).split(_WRITE_SLICE_ELEMENTS)
        )
    else:
        pairs = iter([(weight, update)])
    for weights, step in pairs:
        if generator is not None:
            weights.copy_(stochastic_round_to_bf16(weights.float() - step, generator))
        else:
            weights.sub_(step.to(weights.dtype))


def _minus(values: torch.Tensor, steps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``values - steps`` in the dense step's arithmetic: rounded stochastically to bf16 with
    ``generator``, else with the step rounded to the weight's dtype first."""
    if generator is not None:
        return stochastic_round_to_bf16(values.float() - steps, generator)
    return values - steps.to(values.dtype)


def _apply_deferred_rows_(
    weight: torch.Tensor,
    kept: RowCoordinates,
    step: torch.Tensor,
    picked: Selected | None,
    generator: torch.Generator | None = None,
) -> None:
    """:meth:`RestStepper.apply_deferred` by rows: the same ``weight - step`` per coordinate
    (a bf16 weight's rounded with ``generator``), without the flat int64 index of every kept
    coordinate (8 bytes per coordinate, and several copies of it for the pick's membership
    test: on a llama-350m vocabulary matrix the largest tensors of the selecting step's peak)."""
    size, split = kept.row_size, kept.rows.numel() * kept.row_size
    rows, extra = kept.rows.long(), kept.extra.long()
    row_steps, extra_steps = step[:split].view(-1, size), step[split:]
    flat = weight.view(-1)
    loose = None
    if picked is not None:
        whole = picked.rows.long() if isinstance(picked, RowCoordinates) else rows[:0]
        loose = picked.extra.long() if isinstance(picked, RowCoordinates) else picked.long()
        stay = ~torch.isin(rows, whole)
        rows, row_steps = rows[stay], row_steps[stay]
        outside = ~torch.isin(extra, loose)
        extra, extra_steps = extra[outside], extra_steps[outside]
    # Adam's single picks may lie inside a kept row stepped whole here: put them back after.
    saved = flat[loose] if loose is not None and loose.numel() else None
    by_row = flat.view(-1, size)
    by_row.index_copy_(0, rows, _minus(by_row.index_select(0, rows), row_steps, generator))
    flat.index_copy_(0, extra, _minus(flat[extra], extra_steps, generator))
    if saved is not None:
        flat.index_copy_(0, loose, saved)


def _step_factored_(
    weight: torch.Tensor,
    prepared: FactoredStep,
    selected: Selected | None,
    lr: float | torch.Tensor,
    decay: float,
    generator: torch.Generator | None = None,
    finite: torch.Tensor | None = None,
) -> None:
    """``weight -= lr * direction + decay * weight`` outside the ``selected`` coordinates (Adam's):
    on the live rows only when that pays and nothing decays (decay moves every row), else in
    place over the whole matrix with the selected entries put back as they were. A bf16 weight
    is rounded as the dense path rounds it (stochastically with ``generator``), slice by slice,
    and always over the whole matrix: the live-rows path adds in the weight's dtype. An
    accelerator always takes the whole matrix (finding live rows is a host read) and passes
    ``finite`` (a 0-dim bool tensor: False zeroes the step) instead of branching on it."""
    low = weight.dtype in (torch.bfloat16, torch.float16)
    live = None if decay or low or prepared.sync_free else prepared.live_rows()
    if live is None:
        kept = None if selected is None else gather(weight, selected)
        subtract = None
        if low:
            subtract = functools.partial(_subtract_in_slices_, generator=generator)
        prepared.apply_(weight, lr, decay, subtract, finite)
        if kept is not None:
            scatter_(weight, selected, kept)
        return
    rows, values = live
    if selected is not None:
        width = weight.shape[1]
        if isinstance(selected, RowCoordinates):
            keep = ~torch.isin(rows, selected.rows.long())
            rows, values, loose = rows[keep], values[keep], selected.extra.long()
        else:
            loose = selected.long()
        if loose.numel() and rows.numel():  # single selected coordinates inside stepped rows
            row_of, column = loose // width, loose % width
            at = torch.searchsorted(rows, row_of).clamp_(max=rows.numel() - 1)
            hit = rows[at] == row_of
            values[at[hit], column[hit]] = 0.0
    weight.index_add_(0, rows, values.mul_(lr).neg_())


class RestStepper:
    """State-free steps for the unselected coordinates of one optimizer's candidates.

    Args:
        rule: the direction of the step.
        lr_scale: the step is ``group lr * lr_scale * direction``.
        weight_decay: decoupled weight decay of the rest; None: the param group's.
        params: the candidate tensors, by candidate index.
        groups: the param group of each candidate (for its current lr).
        comm: averages a gradient over data-parallel ranks before it is used; local shards.
        in_backward: step in the gradient hooks (True) or only in ``step()``.
        held: True while the loop holds gradients for a later backward (accumulation).
        stochastic_rounding: round bf16 weights' steps stochastically (:mod:`.rounding`).
        seed: seed of the rounding generators.
        overrides: another rule for some candidates, by index (``vocab_rest``).
    """

    def __init__(
        self,
        rule: RestRule,
        lr_scale: float,
        weight_decay: float | None,
        params: Sequence[torch.Tensor],
        groups: Sequence[dict[str, Any]],
        comm: Communicator,
        in_backward: bool,
        held: Callable[[], bool],
        stochastic_rounding: bool = True,
        seed: int = 0,
        overrides: dict[int, RestRule] | None = None,
    ) -> None:
        self.rule = rule
        self.overrides = overrides or {}
        self.lr_scale = lr_scale
        self.weight_decay = weight_decay
        self.params = params
        self.groups = groups
        self.comm = comm
        self.in_backward = in_backward
        self.held = held
        self.stochastic_rounding = stochastic_rounding
        self.rounding = RoundingGenerators(seed)
        # A stateful rule's state, by candidate index (kept whether or not the tensor is selected).
        self.rule_states: dict[int, dict[str, torch.Tensor]] = {}
        # This step's gradients already stepped with and freed: squared norms (for clipping)
        # and whether each was finite (checked once, at the step).
        self.consumed_squares: list[torch.Tensor] = []
        self._finite: list[torch.Tensor] = []
        self.stepped: set[int] = set()

    @property
    def holding(self) -> bool:
        return self.held() or not self.in_backward

    # ------------------------------------------------------------------ from the hooks

    def release(self, index: int) -> None:
        """The whole tensor is none of Adam's this step: step with its gradient and free it."""
        if not self.holding:
            self._check_once(index)
            self._step(index, None)

    def release_rest_of(self, index: int, coordinates: Selected) -> None:
        """A partly selected tensor: step its unselected coordinates; the gradient stays."""
        if not self.holding:
            self._check_once(index)
            self._step(index, coordinates)

    def release_outside(self, index: int, kept: Selected) -> torch.Tensor:
        """A shortlisted tensor on a selection step: step every coordinate but ``kept`` now and
        free the gradient; returns the step of ``kept`` (layout order), for
        :meth:`apply_deferred` once the selection knows which of them Adam takes."""
        self._check_once(index)
        return self._step(index, kept, defer=True)

    @torch.no_grad()
    def apply_deferred(
        self,
        index: int,
        kept: Selected,
        step: torch.Tensor,
        picked: Selected | None,
        squares: torch.Tensor | None = None,
    ) -> None:
        """Take the deferred step of the ``kept`` coordinates that Adam did not pick.

        ``squares``: the squared norm of the tensor's whole gradient, when no shortlist counts it
        for clipping any more (a tensor dropped from the plan).
        """
        if squares is not None:
            self.consumed_squares.append(squares)
        weight = self.comm.local(self.params[index])
        stochastic = weight.dtype == torch.bfloat16 and self.stochastic_rounding
        generator = self.rounding.for_tensor(weight) if stochastic else None
        if isinstance(kept, RowCoordinates) and weight.is_contiguous():
            _apply_deferred_rows_(weight, kept, step, picked, generator)
            return
        where = as_flat(kept).long()
        if picked is not None:
            outside = ~torch.isin(where, as_flat(picked).long())
            where, step = where[outside], step[outside]
        flat = weight.view(-1)
        flat.index_copy_(0, where, _minus(flat[where], step, generator))

    def _check_once(self, index: int) -> None:
        if index in self.stepped:
            raise RuntimeError(
                "BlockLLM: a second gradient arrived for a tensor whose state-free rest step was "
                "already taken in this step. For gradient accumulation wrap every backward but "
                "the last in `with optimizer.hold_gradients():`, or build the optimizer with "
                "rest_in_backward=False."
            )

    # ------------------------------------------------------------------ from step()

    def still_to_step(self, selection: Coordinates | None) -> list[int]:
        """Candidates whose held gradient the rest has yet to step with: whole, or outside its
        selected coordinates; on a selection step (``selection=None``) every held one may be."""
        return [
            index for index, param in enumerate(self.params)
            if param.grad is not None and index not in self.stepped
            and (selection is None or selection.get(index, ()) is not None)
        ]  # fmt: skip

    def sweep(self, selection: Coordinates) -> None:
        """Step with every gradient still held that Adam will not use (held or deferred ones)."""
        for index in self.still_to_step(selection):
            self._step(index, selection.get(index))

    def finite_flag(self) -> torch.Tensor | None:
        """Every gradient the rest stepped with this step was finite (a 0-d bool tensor, not
        read; None when it stepped with none)."""
        return torch.stack(self._finite).all() if self._finite else None

    def end_step(self) -> None:
        self.consumed_squares.clear()
        self._finite.clear()
        self.stepped.clear()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def _step(
        self, index: int, selected: Selected | None, defer: bool = False
    ) -> torch.Tensor | None:
        """Step the coordinates outside ``selected``; with ``defer`` also free the gradient and
        return the step ``selected`` would take (a shortlist's, whose squared norm the
        selection counts whole for clipping)."""
        param = self.params[index]
        self.comm.average_grads_([(index, param.grad)])
        grad, weight = self.comm.local(param.grad), self.comm.local(param)
        self.stepped.add(index)
        squares = squared_norm(grad)  # no squared copy: this runs for every tensor
        if selected is not None and not defer:
            squares = squares - gather(grad, selected).to(squares.dtype).square().sum()
        finite = torch.isfinite(squares)
        if not defer:
            self.consumed_squares.append(squares)
        self._finite.append(finite)
        group = self.groups[index]
        lr = group["lr"]
        decay = group["weight_decay"] if self.weight_decay is None else self.weight_decay
        if selected is None and not decay and self._plain_sign(index, grad, weight, lr):
            # signSGD on a whole full-precision tensor, as the general path below computes it
            # (bitwise: w - sign * lr), in half its passes over memory: the sign taken in place
            # on the gradient, which is freed next anyway, and one fused add into the weight.
            # This runs for most of the model at every step.
            _sign_step_(weight, grad, finite, -(lr * self.lr_scale))
            param.grad = None
            return None
        if self._in_place(index, grad, weight):
            # The factored rule: no full-size direction (:class:`FactoredStep`), the same
            # arithmetic per entry; on a CPU an embedding is stepped on the batch's rows only,
            # on an accelerator nothing is read on the host (``finite`` masks the step).
            prepared = self._direction(index, grad, finite, prepare=True)
            mask = finite if prepared.sync_free else None
            take = mask is not None or bool(finite)
            deferred = None
            if defer and not take:  # no step, for the kept coordinates either
                deferred = torch.zeros(selected.numel(), dtype=prepared.work_dtype, device=weight.device)
            if take:
                lr_scaled, decay_scaled = lr * self.lr_scale, float(decay) * float(lr)
                if defer:  # the kept coordinates' step, as the general path's gather gives it
                    deferred = prepared.at_selected(selected).mul_(lr_scaled)
                    if decay:
                        deferred.add_(gather(weight, selected), alpha=decay_scaled)
                    if mask is not None:
                        deferred.masked_fill_(~mask, 0.0)
                stochastic = weight.dtype == torch.bfloat16 and self.stochastic_rounding
                generator = self.rounding.for_tensor(weight) if stochastic else None
                _step_factored_(weight, prepared, selected, lr_scaled, decay_scaled, generator, mask)
            if selected is None or defer:
                param.grad = None
            return deferred
        # At least fp32 arithmetic: a bf16 weight's step is rounded once, at the end.
        work = torch.promote_types(weight.dtype, torch.float32)
        if grad.dim() >= 2 and self._prepares(index):
            # The rule's direction as it computes it (fp32), not rounded to a bf16 gradient's
            # dtype and widened again: two full-size copies fewer at the backward's peak.
            update = self._direction(index, grad, finite, prepare=True).dense().view(grad.shape)
        else:
            update = self._direction(index, grad, finite)
        update = update.to(work)
        if update.data_ptr() == grad.data_ptr() or update.data_ptr() == weight.data_ptr():
            update = update.clone()  # a user rule may hand back its input: never scale that
        # In place from here on: each full-size temporary costs time and, on a vocabulary
        # matrix, a peak of its own.
        update.mul_(lr * self.lr_scale)
        if decay:  # a bf16 weight is widened inside the kernel: no fp32 copy of it
            update.add_(weight, alpha=float(decay) * float(lr))
        _zero_unless_finite(update, finite)
        deferred = None
        if selected is not None:
            if defer:
                deferred = gather(update, selected)
            fill_(update, selected, 0.0)
        stochastic = weight.dtype == torch.bfloat16 and self.stochastic_rounding
        generator = self.rounding.for_tensor(weight) if stochastic else None
        _subtract_in_slices_(weight, update, generator)
        if selected is None or defer:
            param.grad = None
        return deferred

    def _prepares(self, index: int) -> bool:
        """The tensor's rule has ``prepare`` (the factored rule: a matrix's fp32 direction)."""
        return hasattr(self.overrides.get(index, self.rule), "prepare")

    def _plain_sign(
        self, index: int, grad: torch.Tensor, weight: torch.Tensor, lr: float | torch.Tensor
    ) -> bool:
        """The built-in sign rule on a full-precision weight of the gradient's dtype, at a float
        lr: the case :meth:`_step`'s fast path computes exactly as its general path does."""
        return (
            type(self.overrides.get(index, self.rule)) is SignRest
            and grad.dtype == weight.dtype
            and weight.dtype not in (torch.bfloat16, torch.float16)
            and isinstance(lr, float)
        )

    def _in_place(self, index: int, grad: torch.Tensor, weight: torch.Tensor) -> bool:
        """The rule can step a matrix in place (``prepare``): a contiguous matrix of the
        gradient's dtype (a bf16 one rounded slice by slice as the dense path rounds it whole),
        on any device. The dense path's fp32 direction over the largest matrix (4 bytes per
        entry: 2.1 GB for an 8B Llama's embedding) would sit at the backward's peak."""
        return (
            self._prepares(index)
            and weight.dim() == 2
            and grad.dtype == weight.dtype
            and weight.dtype in (torch.float32, torch.float64, torch.bfloat16)
            and weight.is_contiguous()
            and grad.is_contiguous()
        )

    def _direction(
        self, index: int, grad: torch.Tensor, finite: torch.Tensor, prepare: bool = False
    ) -> Any:
        """The rule's direction; with ``prepare`` its ``prepare`` result."""
        rule = self.overrides.get(index, self.rule)
        init = getattr(rule, "init_state", None)
        if init is None:
            return rule.direction(grad)
        state = self.rule_states.get(index)
        if state is None:
            state = self.rule_states[index] = init(grad)
        # Under FSDP2 the rule sums what spans the ranks itself, inside this call (every rank
        # makes it for the same tensors in the same order: no rank may skip it).
        shards = self.comm.shards(self.params[index])
        extra = {} if shards is None else {"shards": shards}
        # A non-finite gradient must not reach the statistics (they would poison every later
        # step): keep the old values then, without a host sync (the state is O(rows + columns)).
        before = {key: value.clone() for key, value in state.items()}
        direction = rule.prepare(grad, state, **extra) if prepare else rule.direction(grad, state, **extra)
        for key, value in state.items():
            value.copy_(torch.where(finite, value, before[key]))
        return direction

    @property
    def state_bytes(self) -> int:
        """Bytes of the rule's own state (a stateful rule's; 0 for sign and colnorm)."""
        return sum(
            t.numel() * t.element_size() for state in self.rule_states.values() for t in state.values()
        )

    def state_dict(self, names: Sequence[str]) -> dict[str, Any]:
        """The rounding generators' states by device, and a stateful rule's state by name."""
        return {
            "rounding": self.rounding.state_dict(),
            "rule": {
                names[index]: {key: value.detach().cpu().clone() for key, value in state.items()}
                for index, state in self.rule_states.items()
            },
        }

    def load_state_dict(self, saved: dict[str, Any], names: Sequence[str]) -> None:
        self.rounding.load_state_dict(saved.get("rounding", {}))
        index_of = {name: index for index, name in enumerate(names)}
        self.rule_states = {
            index_of[name]: {
                key: value.to(self.params[index_of[name]].device).clone()
                for key, value in state.items()
            }
            for name, state in saved.get("rule", {}).items()
        }


__all__ = ["RestStepper"]
