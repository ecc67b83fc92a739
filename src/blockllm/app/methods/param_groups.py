"""Param groups for the methods' builders: weight-decayed matrices, undecayed vectors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing the registry must not load torch
    from torch import nn

logger = logging.getLogger(__name__)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into weight-decayed matrices and undecayed vectors.

    Matrices and embeddings (``ndim >= 2``) decay; norms' scales and biases do not: decaying them
    only pulls activations towards zero (the nanoGPT/GaLore convention). Each group carries the
    parameter names under ``"names"``, which BlockLLM needs and torch optimizers ignore.

    Args:
        model: The model whose ``named_parameters()`` with ``requires_grad`` are grouped.
        weight_decay: Decay of the matrix group.

    Returns:
        One or two param groups (an empty group is left out).
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append((name, param))
    groups = []
    for members, rate in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {
                    "params": [param for _, param in members],
                    "names": [name for name, _ in members],
                    "weight_decay": rate,
                }
            )
    logger.info(
        "Param groups: %d tensors with weight decay %.3g, %d without",
        len(decay), weight_decay, len(no_decay),
    )  # fmt: skip
    return groups


__all__ = ["decay_groups"]
