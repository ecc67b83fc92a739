"""Param groups for any optimizer: decayed matrices, undecayed vectors, the vocabulary's own lr.

The split the measurements in ``benchmarks/README.md`` use for every method: weight decay on
matrices only, and optionally a learning rate of their own for the embedding and the output head,
the largest single quality lever found there (AdamW gains about 20 % in eval loss on the CPU
pretraining suites from giving them 30x the lr of the rest; BlockLLM's best point is half
AdamW's lr with the vocabulary at 20x that).
"""

from __future__ import annotations

import logging
import math
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


def trainable_vocabulary(model: nn.Module, argument: str, value: object) -> set[int]:
    """The ``id`` of the trainable embedding and head weights, for ``argument=value`` to act on.

    Raises:
        ValueError: ``value`` is not a finite positive number, or the model has no trainable
            vocabulary weight (none through its accessors, or all frozen): the setting would
            silently do nothing.
    """
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {argument}: {value!r} (expected a number > 0, or None)")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    vocabulary = vocabulary_parameters(model) & trainable
    if not vocabulary:
        raise ValueError(
            f"Invalid {argument}: {value!r} for a {type(model).__name__}, which has no trainable "
            "get_input_embeddings()/get_output_embeddings() weight to give it to (none, or "
            "frozen); build the groups yourself ({'params': [...], 'lr': ...}) for such a model"
        )
    return vocabulary


def param_groups(
    model: nn.Module, *, weight_decay: float = 0.0, vocab_lr: float | None = None
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
        One to three param groups (an empty group is left out), for ``BlockLLM(groups, lr=...)``
        or any ``torch.optim`` optimizer.

    Raises:
        ValueError: ``vocab_lr`` is given and the model has no trainable
            ``get_input_embeddings``/``get_output_embeddings`` weight to give it to, or a value
            is not a finite number (``vocab_lr`` must be positive, ``weight_decay`` at least 0).

    Example:
        >>> opt = BlockLLM(param_groups(model, weight_decay=0.1, vocab_lr=1e-2), lr=5e-4)
    """
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
            and weight_decay >= 0):  # fmt: skip
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (expected a number >= 0)")
    vocabulary: set[int] = set()
    if vocab_lr is not None:
        vocabulary = trainable_vocabulary(model, "vocab_lr", vocab_lr)
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


__all__ = ["param_groups", "trainable_vocabulary", "vocabulary_parameters"]
