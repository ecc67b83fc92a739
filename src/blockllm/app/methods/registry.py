"""The registry of the optimizers the training loop can run, by name: one entry per method.

Adding a method (GaLore, BAdam, LoRA, 8-bit AdamW ...) is one :class:`OptimizerSpec` passed to
:func:`register_optimizer`: a builder ``(model, config) -> Optimizer``, and, only when needed, a
``prepare_model`` hook (LoRA wraps the model), ``takes_loss`` (the optimizer wants
``step(loss=...)``) and ``stats`` (numbers for the metrics and the progress bar). The loop never
branches on the optimizer's name. The built-in methods register themselves in
:mod:`blockllm.app.methods.adamw`, :mod:`~blockllm.app.methods.blockllm_variants` and
:mod:`~blockllm.app.methods.peers`; importing :mod:`blockllm.app.methods` (or any module in it)
registers all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry is read by `--help`, which should not wait for torch
    import torch
    from torch import nn

    from blockllm.app.training.run_config import RunConfig

Builder = Callable[["nn.Module", "RunConfig"], "torch.optim.Optimizer"]


def _no_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and drive one optimizer.

    Attributes:
        name: The ``--optimizer`` value.
        build: Makes the optimizer for a model (after ``prepare_model``) and a run config.
        description: One line for ``--help`` and the docs.
        takes_loss: Pass the step's loss as ``optimizer.step(loss=...)`` (BlockLLM's trigger).
        prepare_model: Optional ``(model, config) -> model`` run before ``build`` (adapters).
        stats: ``optimizer -> {name: number}`` logged with every metrics line.
        keeps_masters: Keeps fp32 master copies of bf16 weights itself (``--precision
            bf16-pure`` is refused for an optimizer that does not: it would round every step).
        skipped_steps: ``optimizer -> count`` of the steps the optimizer itself skipped because
            the loss or a gradient was NaN/inf. None (the default) means it does not check, and
            the loop skips such steps for it, so that one bad batch cannot write NaN into the
            weights. An optimizer that checks must see those steps (BlockLLM discards a
            selection scored on bad gradients), so the loop then hands every step to it.
    """

    name: str
    build: Builder
    description: str
    takes_loss: bool = False
    prepare_model: Callable[[nn.Module, RunConfig], nn.Module] | None = None
    stats: Callable[[torch.optim.Optimizer], dict[str, float]] = field(default=_no_stats)
    skipped_steps: Callable[[torch.optim.Optimizer], int] | None = None
    keeps_masters: bool = False


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Add ``spec`` to :data:`OPTIMIZERS`.

    Raises:
        ValueError: the name is taken and ``replace`` is False.
    """
    if spec.name in OPTIMIZERS and not replace:
        raise ValueError(f"Invalid optimizer name: {spec.name!r} is already registered")
    OPTIMIZERS[spec.name] = spec
    return spec


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The registered spec called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return OPTIMIZERS[name]
    except KeyError:
        listed = ", ".join(repr(known) for known in OPTIMIZERS)
        raise ValueError(f"Invalid optimizer: {name!r} (choose from {listed})") from None


__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "get_optimizer_spec",
    "register_optimizer",
]
