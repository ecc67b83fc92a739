"""BlockLLM inside ``accelerate`` (and any other framework that wraps the optimizer).

``Accelerator.prepare`` returns an ``AcceleratedOptimizer`` that wraps the BlockLLM instance. Its
``step(closure=None)`` has no ``loss=`` argument, so the loss reaches the reselection trigger
through :meth:`BlockLLM.record_loss` on the unwrapped optimizer, which :func:`unwrap_blockllm`
finds. This module imports neither accelerate nor transformers: it only follows ``.optimizer``
attributes, the convention that accelerate, DeepSpeed and Trainer wrappers share.

Example:
    >>> model, opt, loader = accelerator.prepare(model, BlockLLM(model.named_parameters()), loader)
    >>> for batch in loader:
    ...     with accelerator.accumulate(model):
    ...         loss = model(**batch).loss
    ...         accelerator.backward(loss)
    ...         unwrap_blockllm(opt).record_loss(loss)   # averaged over micro-batches
    ...         opt.step()                               # skipped until gradients are synced
    ...         opt.zero_grad()
"""

from __future__ import annotations

from typing import Any

from blockllm.optim import BlockLLM

# Wrappers nest at most a few deep (Trainer -> AcceleratedOptimizer -> DeepSpeed -> torch); the
# bound only guards against a wrapper whose .optimizer points back at itself.
_MAX_WRAPPER_DEPTH = 8


def unwrap_blockllm(optimizer: Any) -> BlockLLM:
    """Return the :class:`~blockllm.BlockLLM` inside ``optimizer``, however it is wrapped.

    Args:
        optimizer: a BlockLLM, or a wrapper that reaches one through ``.optimizer`` attributes
            (accelerate's ``AcceleratedOptimizer``, Trainer's ``self.optimizer``).

    Returns:
        The BlockLLM instance itself (not a copy).

    Raises:
        TypeError: no BlockLLM is found; the message names the optimizer type that was found.
    """
    current = optimizer
    for _ in range(_MAX_WRAPPER_DEPTH):
        if isinstance(current, BlockLLM):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    found = "None" if optimizer is None else type(optimizer).__name__
    if current is not optimizer and current is not None:
        found += f" wrapping {type(current).__name__}"
    raise TypeError(
        f"expected a BlockLLM optimizer (or a wrapper around one), got {found}; build it with "
        "blockllm.BlockLLM(model.named_parameters(), ...) or "
        "blockllm.integrations.create_blockllm_optimizer(model, training_args)"
    )


__all__ = ["unwrap_blockllm"]
