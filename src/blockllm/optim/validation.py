"""Checks of the Adam arguments of :class:`blockllm.BlockLLM`, run before anything is touched.

The selection knobs are checked by :class:`blockllm.config.BlockLLMConfig`.

Every message names the argument and the value it got, so a typo in a config file is found at
construction and not hundreds of steps later.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from blockllm.config import check_real


def check_adam_arguments(
    *, lr: Any, betas: Any, eps: Any, weight_decay: Any, foreach: Any, fused: Any
) -> None:
    """Raise ``ValueError``/``TypeError`` for the first bad Adam argument; see ``BlockLLM``."""
    if not isinstance(lr, torch.Tensor):
        if check_real("learning rate", lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
    elif lr.numel() != 1 or not math.isfinite(lr.item()) or lr.item() < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    elif foreach:
        raise ValueError(
            "Invalid learning rate: a Tensor lr is not supported with foreach=True "
            "(torch's foreach Adam refuses it); pass a float, or use fused or the for-loop"
        )
    if check_real("epsilon value", eps) < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if check_real("weight_decay value", weight_decay) < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    for position, beta in enumerate(betas):
        value = check_real(f"beta parameter at index {position}", beta)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {position}: {beta} (must be in [0, 1))")
    for name, flag in (("foreach", foreach), ("fused", fused)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"Invalid {name}: expected True, False or None, got {flag!r}")
    if foreach and fused:
        raise ValueError("Invalid foreach=True with fused=True: they cannot both be True")
