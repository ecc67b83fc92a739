"""Param groups for the methods' builders: weight-decayed matrices, undecayed vectors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing the registry must not load torch
    from torch import nn

logger = logging.getLogger(__name__)


def vocabulary_parameters(model: nn.Module) -> set[int]:
    """The ``id`` of the input and output embedding weights (one, when they are tied).

    Read through the ``get_input_embeddings``/``get_output_embeddings`` of transformers'
    models; a model without them has none.
    """
    found: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if weight is not None:
            found.add(id(weight))
    return found


def decay_groups(
    model: nn.Module, weight_decay: float, vocab_lr: float | None = None
) -> list[dict[str, Any]]:
    """Split trainable parameters into weight-decayed matrices and undecayed vectors.

    Matrices and embeddings (``ndim >= 2``) decay; norms' scales and biases do not: decaying them
    only pulls activations towards zero (the nanoGPT/GaLore convention). Each group carries the
    parameter names under ``"names"``, which BlockLLM needs and torch optimizers ignore.

    Args:
        model: The model whose ``named_parameters()`` with ``requires_grad`` are grouped.
        weight_decay: Decay of the matrix group.
        vocab_lr: A learning rate of their own for the embedding and head matrices (a third
            group, decayed like the matrices); None keeps them with the other matrices.

    Returns:
        One to three param groups (an empty group is left out).
    """
    vocabulary = vocabulary_parameters(model) if vocab_lr is not None else set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    vocab: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in vocabulary:
            vocab.append((name, param))
        else:
            (decay if param.ndim >= 2 else no_decay).append((name, param))
    groups = []
    for members, rate, extra in (
        (decay, weight_decay, {}),
        (no_decay, 0.0, {}),
        (vocab, weight_decay, {"lr": vocab_lr}),
    ):
        if members:
            groups.append(
                {
                    "params": [param for _, param in members],
                    "names": [name for name, _ in members],
                    "weight_decay": rate,
                    **extra,
                }
            )
    logger.info(
        "Param groups: %d tensors with weight decay %.3g, %d without, %d vocabulary matrices "
        "at lr %s",
        len(decay), weight_decay, len(no_decay), len(vocab), vocab_lr,
    )  # fmt: skip
    return groups


__all__ = ["decay_groups", "vocabulary_parameters"]
