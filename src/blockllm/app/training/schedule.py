"""Learning-rate schedule: linear warmup, then cosine decay to a floor (the GaLore recipe).

The multiplier is a pure function of the step, held in a small callable object so that
``LambdaLR.state_dict()`` stores its parameters (torch saves the ``__dict__`` of callable objects,
not of plain functions) and a checkpoint records which schedule it was trained with.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """``lr(step) = peak * multiplier(step)``, for ``step`` = optimizer steps already taken.

    * warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Counting from 1 (HF and
      GaLore count from 0) keeps the very first update from being a wasted step at lr 0.
    * then cosine from 1 down to ``min_ratio`` at ``step = max_steps - 1`` (the last update).

    Args:
        warmup_steps: Steps of linear warmup (0 for none).
        max_steps: Total optimizer steps of the run.
        min_ratio: Final multiplier (0.1 in GaLore).
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> None:
        if max_steps < 1:
            raise ValueError(f"Invalid max_steps: {max_steps} (must be >= 1)")
        if not 0 <= warmup_steps <= max_steps:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (must be in [0, {max_steps}])")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"Invalid min_ratio: {min_ratio} (must be in [0, 1])")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.max_steps - 1 - self.warmup_steps
        if decay_steps <= 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    max_steps: int,
    min_ratio: float,
    start_step: int = 0,
) -> LambdaLR:
    """A ``LambdaLR`` driving every param group of ``optimizer`` with :class:`WarmupCosine`.

    Args:
        optimizer: Its param groups' ``lr`` is set to the schedule's value at ``start_step``.
        warmup_steps, max_steps, min_ratio: See :class:`WarmupCosine`.
        start_step: Optimizer steps already taken. Above 0, the groups must hold
            ``initial_lr`` (the peak) from an earlier scheduler: a resumed run whose
            ``max_steps`` changed replaces its restored scheduler this way.
    """
    schedule = WarmupCosine(warmup_steps, max_steps, min_ratio)
    # torch counts `last_epoch` from -1; its constructor then takes one step to `start_step`.
    return LambdaLR(optimizer, schedule, last_epoch=start_step - 1)


__all__ = ["WarmupCosine", "build_scheduler"]
