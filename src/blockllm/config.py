"""The knobs of BlockLLM's selection, in one place: one default, one check and one help text each.

:class:`BlockLLMConfig` is what :class:`blockllm.BlockLLM` reads its keyword arguments into, what
:func:`blockllm.integrations.create_blockllm_optimizer` takes, and where the command line's run
configuration gets its BlockLLM flags (names, defaults and help) from. The Adam hyperparameters
(``lr``, ``betas``, ``eps``, ``weight_decay``) are not here: they are per param group, as in every
``torch.optim`` optimizer, and checked by :mod:`blockllm.optim.validation`.

Policies may be given as a name or, in Python, as an object: ``trigger`` (a
:class:`~blockllm.selection.triggers.Trigger`), ``selection`` (a
:class:`~blockllm.selection.packing.SelectionRule`), ``score`` (a
:class:`~blockllm.selection.scorers.Scorer`) and ``rest`` (a
:class:`~blockllm.selection.rest_rules.RestRule`). A name picks a built-in; an unknown name raises.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from blockllm.selection.names import NameMatcher, Pattern
from blockllm.selection.packing import SELECTION_RULES, SelectionRule
from blockllm.selection.rest_rules import REST_RULES, RestRule
from blockllm.selection.scorers import SCORERS, Scorer
from blockllm.selection.triggers import TRIGGERS, Trigger

PARTIALS = ("coordinates", "rows")
#: The dtypes Adam's moments of the selected block may be stored in.
MOMENT_DTYPES = ("float32", "bfloat16")


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BlockLLMConfig:
    """BlockLLM's selection settings: immutable, every field checked on construction.

    Raises:
        ValueError, TypeError: a field's value is invalid; the message names the field and value.
        TypeError: :meth:`from_dict` got keys that are no field (the message lists the fields).
    """

    sparsity: float = _knob(
        0.9, "fraction of candidate coordinates NOT updated at a step, in [0, 1); "
        "the budget is k = floor((1 - sparsity) * N)")
    patience: int = _knob(
        100, "losses observed since the last selection before the loss trigger may fire; "
        "with trigger 'interval', the steps between selections")
    trigger: str | Trigger = _knob(
        "loss", "when to reselect: 'loss' (the paper's plateau rule) or 'interval' (every "
        "patience steps)")
    selection: str | SelectionRule = _knob(
        "tensor", "'tensor' (whole tensors in score order, the remainder on the best one that "
        "did not fit) or 'mask' (the paper's |G| >= tau mask)")
    score: str | Scorer = _knob(
        "grad_norm", "how tensors are ranked: 'grad_norm', 'cyclic' (FRUGAL's order: the least-selected "
        "first, from the output down) or 'random' (the ablation baseline)")
    visit_penalty: bool = _knob(
        True, "divide each tensor's score by 1 + the times it was selected before")
    max_tensor_share: float = _knob(
        0.25, "the largest share of the budget one tensor may take, raised automatically when "
        "the candidates could not use the whole budget otherwise; 1 = no cap")
    partial: str = _knob(
        "rows", "a partly selected tensor trains its 'rows' with the largest gradient norm (the "
        "few leftover coordinates by |G|) or its largest-|G| 'coordinates'")
    keep_moments: bool = _knob(
        False, "keep the Adam moments of a whole tensor that leaves the selection and resume them "
        "when it is selected whole again (they stay in memory while it is away, so the state "
        "grows toward AdamW's); False = fresh moments at every entry, as FRUGAL and BAdam")
    entry_warmup: int = _knob(
        0, "steps over which a block entering at a reselection ramps its lr up from "
        "lr / entry_warmup; 0 = off")
    include: Pattern = _knob(
        None, "names that may be selected: a regex (fullmatch) or a list of exact names and "
        "suffixes; None = all")
    exclude: Pattern = _knob(
        None, "names never selected (and frozen): a regex (fullmatch) or a list of exact names "
        "and suffixes; exclusion wins over inclusion")
    seed: int = _knob(0, "seed of the generator behind score 'random'")
    skip_nonfinite: bool = _knob(
        True, "skip a step whose loss or gradients are NaN/inf, leaving everything untouched")
    compact_grads: bool = _knob(
        True, "gather a partly selected tensor's gradient to its selected coordinates as it "
        "lands and free the dense one (clip with BlockLLM.clip_grad_norm_)")
    rest: str | RestRule = _knob(
        "auto", "the state-free step of the candidate coordinates Adam does not update: "
        "'factored' (Adafactor without momentum, O(rows + columns) state), 'sign' (signSGD), "
        "'colnorm' (each row scaled to unit RMS, as SCALE), 'none' (frozen until selected: the "
        "paper's method), or 'auto' = 'factored'")
    vocab_rest: str | RestRule | None = _knob(
        "auto", "the rest rule of the embedding and output head (recognised by the names "
        "language models give them): a rule name; 'auto' = 'factored'; None = rest's")
    factored_beta2: float = _knob(
        0.99, "the decay of the 'factored' rule's second moment (its row and column EMAs of "
        "g**2, bias-corrected), in [0, 1)")
    rest_lr_scale: float = _knob(
        1.0, "the rest step is lr * rest_lr_scale * direction")
    rest_weight_decay: float | None = _knob(
        None, "decoupled weight decay of the rest; None = the param group's weight_decay")
    rest_in_backward: bool = _knob(
        True, "take the rest step in the gradient hooks, freeing each gradient at once (no "
        "full-model gradient); False = in step(), holding every gradient until then")
    stochastic_rounding: bool = _knob(
        True, "round the rest step of bf16 weights (and Adam's, with master_weights=False) "
        "stochastically, so that steps below half a bf16 unit survive on average (no extra "
        "state); False = round to nearest")
    max_grad_norm: float | None = _knob(
        None, "clip, inside step(), what the step applies to this total 2-norm of the whole "
        "gradient (for loops that cannot call clip_grad_norm_ themselves); None = no clipping")
    always_adam: Pattern = _knob(
        None, "names trained with Adam whole at every step, outside the budget: a regex or a list "
        "of names, as for exclude; 'auto' = vectors (norms, biases) and the embedding and output "
        "head, by the names language models give them")
    moment_dtype: str = _knob(
        "float32", "the dtype Adam's moments are stored in: 'float32', or 'bfloat16' (half the "
        "optimizer state, so twice the block at the same memory; the update still runs in fp32 "
        "and its moments are rounded stochastically, so that EMA steps below half a bf16 unit "
        "survive on average)")
    master_weights: bool = _knob(
        True, "keep an fp32 master copy of each bf16 coordinate Adam updates; False = step a "
        "widened copy and write it back into the bf16 weight with the rounding "
        "stochastic_rounding names (4 bytes less per updated coordinate; fp16 weights keep "
        "their masters)")

    def __post_init__(self) -> None:
        value = check_real("sparsity", self.sparsity)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid sparsity: {self.sparsity} (must be in [0, 1))")
        _integer("patience", self.patience, minimum=1)
        _policy("trigger", self.trigger, TRIGGERS, Trigger)
        _policy("selection", self.selection, SELECTION_RULES, SelectionRule)
        _policy("score", self.score, SCORERS, Scorer)
        _flag("visit_penalty", self.visit_penalty)
        share = check_real("max_tensor_share", self.max_tensor_share)
        if not 0.0 < share <= 1.0:
            raise ValueError(
                f"Invalid max_tensor_share: {self.max_tensor_share} (must be in (0, 1])"
            )
        _choice("partial", self.partial, PARTIALS)
        _flag("keep_moments", self.keep_moments)
        _integer("entry_warmup", self.entry_warmup, minimum=0)
        NameMatcher("include", self.include)
        NameMatcher("exclude", self.exclude)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"Invalid seed: expected an int, got {self.seed!r}")
        _flag("skip_nonfinite", self.skip_nonfinite)
        _flag("compact_grads", self.compact_grads)
        _policy("rest", self.rest, (*REST_RULES, "auto"), RestRule)
        if self.vocab_rest is not None:
            moving = (*(name for name in REST_RULES if name != "none"), "auto")
            _policy("vocab_rest", self.vocab_rest, moving, RestRule)
        if not 0.0 <= check_real("factored_beta2", self.factored_beta2) < 1.0:
            raise ValueError(f"Invalid factored_beta2: {self.factored_beta2} (must be in [0, 1))")
        if check_real("rest_lr_scale", self.rest_lr_scale) <= 0.0:
            raise ValueError(f"Invalid rest_lr_scale: {self.rest_lr_scale} (must be > 0)")
        if self.rest_weight_decay is not None:
            if check_real("rest_weight_decay", self.rest_weight_decay) < 0.0:
                raise ValueError(
                    f"Invalid rest_weight_decay: {self.rest_weight_decay} (must be >= 0)"
                )
        _flag("rest_in_backward", self.rest_in_backward)
        _flag("stochastic_rounding", self.stochastic_rounding)
        if self.max_grad_norm is not None and check_real("max_grad_norm", self.max_grad_norm) <= 0:
            raise ValueError(f"Invalid max_grad_norm: {self.max_grad_norm} (must be > 0, or None)")
        if self.always_adam != "auto":
            NameMatcher("always_adam", self.always_adam)
        _choice("moment_dtype", self.moment_dtype, MOMENT_DTYPES)
        _flag("master_weights", self.master_weights)

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        """The knobs, in declaration order (each with ``default`` and ``metadata["help"]``)."""
        return dataclasses.fields(cls)

    def to_dict(self) -> dict[str, Any]:
        """The knobs as a plain dict (policy objects are kept as they are)."""
        return {knob.name: getattr(self, knob.name) for knob in self.fields()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockLLMConfig:
        """A config from a dict of knobs; unknown keys raise ``TypeError`` naming the valid ones."""
        _check_names(values)
        return cls(**values)

    def replace(self, **changes: Any) -> BlockLLMConfig:
        """A copy with ``changes`` applied (and checked); ``self`` when there are none.

        Raises:
            TypeError: a change names no knob (the message lists them).
        """
        _check_names(changes)
        return dataclasses.replace(self, **changes) if changes else self  # frozen: shareable


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite float (a one-element tensor is read out), or a named error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def _check_names(values: dict[str, Any]) -> None:
    names = [knob.name for knob in dataclasses.fields(BlockLLMConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(
            f"Unknown BlockLLM knobs {', '.join(map(repr, unknown))} (the knobs are "
            f"{', '.join(names)})"
        )


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a bool, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, choices))})")


def _policy(name: str, value: Any, choices: Sequence[str], protocol: type) -> None:
    """A built-in's name, or an object that has the protocol's methods."""
    if isinstance(value, str) or not isinstance(value, protocol):
        if not isinstance(value, str):
            raise TypeError(
                f"Invalid {name}: expected one of {', '.join(map(repr, choices))} or a "
                f"{protocol.__name__}, got {type(value).__name__} {value!r}"
            )
        _choice(name, value, choices)


DEFAULTS = BlockLLMConfig()
"""The defaults (``BlockLLM`` starts from them when given no config)."""

__all__ = ["DEFAULTS", "MOMENT_DTYPES", "PARTIALS", "BlockLLMConfig", "check_real"]
