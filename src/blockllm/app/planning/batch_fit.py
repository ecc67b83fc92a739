"""``blockllm estimate --fit GB``: the largest micro-batch each method can take within a memory size.

The question users of every peer ask before renting a card is not only "does batch B fit?" but
"what batch fits?". Each method's total (:meth:`MethodMemory.total`, the estimate's upper bound of
the step's peak) grows with the batch through the activations alone, so the largest batch that
stays within the budget is found by doubling and then bisecting, a few dozen evaluations of the
arithmetic per method: milliseconds, even for an 8B config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from blockllm.app.planning.activation_memory import activation_memory
from blockllm.app.planning.memory_plan import method_model
from blockllm.app.planning.method_memory import EstimateSettings
from blockllm.app.planning.model_shapes import ModelShape

# No search goes past this many sequences per micro-batch (a bound, not a recommendation).
MAX_BATCH = 1 << 20


def largest_batch(shape: ModelShape, settings: EstimateSettings, method: str, budget: int) -> int:
    """The largest micro-batch of ``settings.seq_len``-token sequences whose estimated total for
    ``method`` is at most ``budget`` bytes (``settings.batch_size`` is ignored); 0 when not even
    one sequence fits, :data:`MAX_BATCH` when that much does.

    Raises:
        ValueError: an unknown method, or one without a memory model.
    """
    modelled = method_model(method)
    if modelled is None:
        raise ValueError(f"Invalid optimizer for --fit: {method!r} has no memory model")

    def fits(batch: int) -> bool:
        step = dataclasses.replace(settings, batch_size=batch)
        activations = activation_memory(shape, batch, step.seq_len, step.precision)
        return modelled(shape, step, activations).total(step.gradient_checkpointing) <= budget

    if not fits(1):
        return 0
    low, high = 1, 2  # fits(low) holds; the search keeps it so
    while high <= MAX_BATCH and fits(high):
        low, high = high, 2 * high
    if high > MAX_BATCH:
        return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def largest_batches(
    shape: ModelShape, settings: EstimateSettings, methods: Sequence[str], budget: int
) -> dict[str, int]:
    """:func:`largest_batch` of each method, in the order given."""
    if budget <= 0:
        raise ValueError(f"Invalid fit: {budget} bytes (must be > 0)")
    return {method: largest_batch(shape, settings, method, budget) for method in methods}


def format_fit(batches: dict[str, int], seq_len: int, budget: int) -> str:
    """The lines ``--fit`` prints under the table: each method's largest batch and its tokens."""
    lines = [
        f"largest micro-batch of {seq_len}-token sequences within {budget / 1e9:g} GB (each "
        "method's total, an upper bound of its peak; leave room for the CUDA context and the "
        "allocator's slack, about 1-2 GB on a GPU):"
    ]
    width = max(len(method) for method in batches)
    for method, batch in batches.items():
        if batch == 0:
            verdict = "does not fit (not even one sequence)"
        elif batch == MAX_BATCH:
            verdict = f"{batch} or more"
        else:
            verdict = f"{batch} ({batch * seq_len:,} tokens)"
        lines.append(f"  {method.ljust(width)}  {verdict}")
    return "\n".join(lines)


__all__ = ["MAX_BATCH", "format_fit", "largest_batch", "largest_batches"]
