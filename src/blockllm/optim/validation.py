"""Argument checks for :class:`blockllm.BlockLLM`, run before anything is touched.

Every message names the argument and the value it got, so a typo in a config file is found at
construction and not hundreds of steps later.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import torch

TRIGGERS = ("loss", "interval")
SELECTIONS = ("tensor", "mask")
SCORES = ("grad_norm", "random")
PARTIALS = ("coordinates", "rows")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_real(value):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, choices))})")


def check_arguments(
    *,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    sparsity: Any,
    patience: Any,
    trigger: Any,
    selection: Any,
    score: Any,
    visit_penalty: Any,
    seed: Any,
    foreach: Any,
    fused: Any,
    max_tensor_share: Any = 1.0,
    partial: Any = "coordinates",
    entry_warmup: Any = 0,
) -> None:
    """Raise ``ValueError``/``TypeError`` for the first bad argument; see ``BlockLLM``."""
    if not isinstance(lr, torch.Tensor):
        if _check_real("learning rate", lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
    elif lr.numel() != 1 or not math.isfinite(lr.item()) or lr.item() < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    elif foreach:
        raise ValueError(
            "Invalid learning rate: a Tensor lr is not supported with foreach=True "
            "(torch's foreach Adam refuses it); pass a float, or use fused or the for-loop"
        )
    if _check_real("epsilon value", eps) < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if _check_real("weight_decay value", weight_decay) < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    for position, beta in enumerate(betas):
        value = _check_real(f"beta parameter at index {position}", beta)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {position}: {beta} (must be in [0, 1))")
    value = _check_real("sparsity", sparsity)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid sparsity: {sparsity} (must be in [0, 1))")
    if isinstance(patience, bool) or not isinstance(patience, numbers.Integral):
        raise TypeError(f"Invalid patience: expected an int, got {type(patience).__name__} {patience!r}")
    if patience < 1:
        raise ValueError(f"Invalid patience: {patience} (must be >= 1)")
    _check_choice("trigger", trigger, TRIGGERS)
    _check_choice("selection", selection, SELECTIONS)
    _check_choice("score", score, SCORES)
    if not isinstance(visit_penalty, bool):
        raise TypeError(f"Invalid visit_penalty: expected a bool, got {visit_penalty!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"Invalid seed: expected an int, got {seed!r}")
    share = _check_real("max_tensor_share", max_tensor_share)
    if not 0.0 < share <= 1.0:
        raise ValueError(f"Invalid max_tensor_share: {max_tensor_share} (must be in (0, 1])")
    _check_choice("partial", partial, PARTIALS)
    if isinstance(entry_warmup, bool) or not isinstance(entry_warmup, numbers.Integral):
        raise TypeError(
            f"Invalid entry_warmup: expected an int, got {type(entry_warmup).__name__} "
            f"{entry_warmup!r}"
        )
    if entry_warmup < 0:
        raise ValueError(f"Invalid entry_warmup: {entry_warmup} (must be >= 0)")
    for name, flag in (("foreach", foreach), ("fused", fused)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"Invalid {name}: expected True, False or None, got {flag!r}")
    if foreach and fused:
        raise ValueError("Invalid foreach=True with fused=True: they cannot both be True")


def budget_for(sparsity: float, total: int) -> int:
    """``k = floor((1 - sparsity) * total)``, in decimal arithmetic.

    ``(1 - 0.9) * 100`` is ``9.999...`` in binary floating point; users mean 10. Reading the
    float through its shortest decimal repr gives the value they typed.
    """
    return math.floor((1 - Fraction(repr(float(sparsity)))) * total)
