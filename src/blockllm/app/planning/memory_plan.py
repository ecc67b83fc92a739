"""``blockllm estimate``'s answer: the memory of one training step for each method, side by side.

:func:`estimate_memory` reads the model's shape (no weights are allocated), counts the
activations once, asks each method's model (:mod:`blockllm.app.planning.method_memory`) for its
categories, and keeps AdamW as the reference every ratio is taken against. :func:`format_plan`
and :meth:`MemoryPlan.to_dict` are the table and the JSON the command prints.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from blockllm.app.planning.activation_memory import ActivationMemory, activation_memory
from blockllm.app.planning.method_memory import (
    METHOD_MODELS,
    EstimateSettings,
    MethodMemory,
    MethodModel,
    adamw_memory,
    blockllm_memory,
)
from blockllm.app.planning.model_shapes import ModelShape, load_model_shape

#: The methods estimated when none are named, in this order (those registered; BlockLLM variants
#: with a ``rest`` rule follow ``blockllm``).
DEFAULT_METHODS = ("adamw", "blockllm", "adamw-8bit", "galore", "lora", "badam", "lisa")

_CATEGORIES = ("weights", "gradients", "optimizer_state", "master_weights")


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for one model and step, every method's categories and the AdamW reference.

    Attributes:
        shape: The model.
        settings: The step (batch, precision, checkpointing, BlockLLM's knobs).
        activations: The activation count shared by the methods.
        rows: One entry per method estimated, in the order asked.
        baseline: AdamW's entry (the ratios' reference, estimated even when not asked for).
        skipped: ``(method, reason)`` for the methods that could not be modelled.
    """

    shape: ModelShape
    settings: EstimateSettings
    activations: ActivationMemory
    rows: tuple[MethodMemory, ...]
    baseline: MethodMemory
    skipped: tuple[tuple[str, str], ...]

    def total(self, row: MethodMemory) -> int:
        return row.total(self.settings.gradient_checkpointing)

    def ratio(self, row: MethodMemory) -> float:
        """``row``'s total over AdamW's, both under the same settings."""
        return self.total(row) / self.total(self.baseline)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON values (bytes as ints)."""
        shape = self.shape
        return {
            "model": {
                "name": shape.name, "model_type": shape.model_type,
                "num_parameters": shape.num_parameters, "hidden_size": shape.hidden,
                "intermediate_size": shape.intermediate, "num_layers": shape.layers,
                "num_heads": shape.heads, "num_kv_heads": shape.kv_heads,
                "head_dim": shape.head_dim, "vocab_size": shape.vocab,
                "tied_embeddings": shape.tied,
            },
            "settings": {
                "batch_size": self.settings.batch_size, "seq_len": self.settings.seq_len,
                "precision": self.settings.precision,
                "gradient_checkpointing": self.settings.gradient_checkpointing,
                "sparsity": self.settings.sparsity, "exclude": self.settings.exclude,
                "always_adam": self.settings.always_adam,
            },
            "activations": {
                "saved_bytes": self.activations.saved,
                "loss_transient_bytes": self.activations.loss_transient,
                "per_layer_bytes": self.activations.per_layer,
                "head_bytes": self.activations.head,
                "autocast_weight_copies_bytes": self.activations.weight_copies,
                "total_bytes": self.activations.total,
                "checkpointed_bytes": self.activations.checkpointed,
            },
            "methods": [self._row_dict(row) for row in self.rows],
            "skipped": [{"method": method, "reason": reason} for method, reason in self.skipped],
        }  # fmt: skip

    def _row_dict(self, row: MethodMemory) -> dict[str, Any]:
        values: dict[str, Any] = {"method": row.method}
        for name in _CATEGORIES:
            values[f"{name}_bytes"] = getattr(row, name)
        values["gradient_transient_bytes"] = row.gradient_transient
        values["rest_work_bytes"] = row.rest_work
        values["activations_bytes"] = row.activations
        values["activations_checkpointed_bytes"] = row.activations_checkpointed
        values["total_bytes"] = self.total(row)
        values["ratio_to_adamw"] = round(self.ratio(row), 4)
        values["notes"] = list(row.notes)
        return values


def default_methods() -> list[str]:
    """:data:`DEFAULT_METHODS` that are registered, with BlockLLM's ``rest`` variants after it."""
    from blockllm.app.methods import OPTIMIZERS
    from blockllm.app.methods.blockllm_variants import blockllm_knobs

    rest_variants = [
        name for name in OPTIMIZERS
        if name != "blockllm" and (blockllm_knobs(name) or {}).get("rest", "none") != "none"
    ]  # fmt: skip
    names: list[str] = []
    for name in DEFAULT_METHODS:
        if name in OPTIMIZERS:
            names.append(name)
        if name == "blockllm":
            names.extend(rest_variants)
    return names


def method_model(name: str) -> MethodModel | None:
    """The memory model of ``--optimizer name``, or None when there is none.

    Raises:
        ValueError: ``name`` is not a registered optimizer.
    """
    from blockllm.app.methods import OPTIMIZERS
    from blockllm.app.methods.blockllm_variants import blockllm_knobs

    if name not in OPTIMIZERS:
        listed = ", ".join(map(repr, OPTIMIZERS))
        raise ValueError(f"Invalid optimizer: {name!r} (choose from {listed})")
    knobs = blockllm_knobs(name)
    if knobs is not None:
        return functools.partial(blockllm_memory, method=name, knobs=knobs)
    return METHOD_MODELS.get(name)


def estimate_memory(
    model: str | ModelShape,
    settings: EstimateSettings,
    methods: list[str] | None = None,
    *,
    vocab_size: int | None = None,
) -> MemoryPlan:
    """Estimate the memory of one training step for each method.

    Args:
        model: A preset name, a ``config.json`` path, or a shape already read.
        settings: The step.
        methods: ``--optimizer`` names; default :func:`default_methods`.
        vocab_size: Overrides the vocabulary of ``model`` (a name or path).

    Returns:
        The plan; methods without a memory model are listed in ``skipped``.

    Raises:
        ValueError: an unknown model, optimizer or precision, or a bad count.
        ImportError: ``transformers`` is not installed.
    """
    shape = (
        model if isinstance(model, ModelShape) else load_model_shape(model, vocab_size=vocab_size)
    )
    activations = activation_memory(
        shape, settings.batch_size, settings.seq_len, settings.precision
    )
    rows: list[MethodMemory] = []
    skipped: list[tuple[str, str]] = []
    for name in methods if methods is not None else default_methods():
        modelled = method_model(name)
        if modelled is None:
            skipped.append((name, "no memory model for this method"))
            continue
        rows.append(modelled(shape, settings, activations))
    baseline = next(
        (row for row in rows if row.method == "adamw"),
        None,
    ) or adamw_memory(shape, settings, activations)
    return MemoryPlan(shape, settings, activations, tuple(rows), baseline, tuple(skipped))


def format_gb(value: int) -> str:
    """Bytes as GB (10^9), with three decimals below 1 GB; ``0`` for nothing at all."""
    if value == 0:
        return "0"
    gigabytes = value / 1e9
    if gigabytes >= 100:
        return f"{gigabytes:.1f}"
    if gigabytes >= 1:
        return f"{gigabytes:.2f}"
    return f"{gigabytes:.3f}"


def model_line(shape: ModelShape) -> str:
    """The model's first line of every estimate: its size and shape."""
    return (
        f"{shape.name}: {shape.num_parameters / 1e6:,.2f}M parameters ({shape.model_type}: "
        f"hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / {shape.kv_heads} "
        f"kv heads, MLP {shape.intermediate}, vocab {shape.vocab}"
        f"{', tied embeddings' if shape.tied else ''})"
    )


def format_plan(plan: MemoryPlan) -> str:
    """The table ``blockllm estimate`` prints, with its header and notes."""
    shape, settings = plan.shape, plan.settings
    checkpointing = "on" if settings.gradient_checkpointing else "off"
    lines = [
        model_line(shape),
        f"step: batch {settings.batch_size} x {settings.seq_len} tokens, {settings.precision}, "
        f"activation checkpointing {checkpointing}, sparsity {settings.sparsity:g}",
        "",
    ]
    header = ["method", "weights", "gradients", "optimizer state", "master weights",
              "activations", "checkpointed", "total", "vs AdamW"]  # fmt: skip
    table = [header]
    for row in plan.rows:
        table.append([
            row.method, format_gb(row.weights), format_gb(row.gradients),
            format_gb(row.optimizer_state), format_gb(row.master_weights),
            format_gb(row.activations), format_gb(row.activations_checkpointed),
            format_gb(plan.total(row)), f"{plan.ratio(row):.2f}x",
        ])  # fmt: skip
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:])
        ]
        lines.append("  ".join(cells).rstrip())
    used = "checkpointed" if settings.gradient_checkpointing else "activations"
    lines += [
        "",
        f"GB = 10^9 bytes. total = weights + gradients + optimizer state + master weights + "
        f"{used}, each at its own peak (an upper bound of the step's peak); vs AdamW = total / "
        "AdamW's total.",
        f"activations: {format_gb(plan.activations.saved)} saved by the forward + "
        f"{format_gb(plan.activations.loss_transient)} of loss gradients (logits x vocab); "
        "a GPU adds its CUDA context and allocator slack.",
    ]
    for row in plan.rows:
        lines.extend(f"{row.method}: {note}" for note in row.notes)
    lines.extend(f"skipped {method}: {reason}" for method, reason in plan.skipped)
    if not shape.llama_like:
        lines.append(
            f"note: the activation count is that of a Llama decoder; {shape.model_type!r} layers "
            "may save more or less"
        )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_METHODS",
    "MemoryPlan",
    "default_methods",
    "estimate_memory",
    "format_gb",
    "format_plan",
    "method_model",
    "model_line",
]
