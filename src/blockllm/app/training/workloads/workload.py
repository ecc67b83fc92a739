"""What the training loop trains: a model, its batches, its loss and its evaluation.

The loop (:mod:`blockllm.app.training.loop`) is the same for pretraining and finetuning; a
:class:`Workload` supplies the parts that differ, and
:func:`blockllm.app.training.workloads.build_workload` picks it. Batches are a pure function of
their index, so a resumed run sees exactly the batches an uninterrupted one would, with no
sampler state to save.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    pass

Batch = dict[str, torch.Tensor]
AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


class Workload(Protocol):
    """The model-and-data half of a run.

    Attributes:
        model: The model to train (on the CPU until the loop moves it).
        info: Sizes worth logging and summarising (parameters, examples, tokens ...).
    """

    model: nn.Module
    info: dict[str, Any]

    def train_batch(self, index: int) -> Batch:
        """Micro-batch number ``index`` (``step * grad_accum + micro``), on the CPU."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """The mean training loss of ``batch`` and the number of tokens it processed."""
        ...

    def evaluate(
        self, model: nn.Module, device: torch.device, autocast: AutocastFactory
    ) -> dict[str, float]:
        """Held-out metrics, with ``eval_loss`` among them (the model is in eval mode, no grad)."""
        ...


def default_cache_dir() -> Path:
    """``$BLOCKLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/blockllm``, else ``~/.cache/blockllm``."""
    explicit = os.environ.get("BLOCKLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "blockllm"


def to_device(batch: Batch, device: torch.device) -> Batch:
    # non_blocking only helps from pinned memory; harmless otherwise.
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def example_indices(count: int, index: int, batch_size: int, seed: int) -> list[int]:
    """Example ids of batch ``index`` when ``count`` examples are reshuffled every epoch.

    Epoch ``e`` walks a permutation seeded with ``seed + e``; batches never straddle an epoch
    boundary (the incomplete tail batch is skipped), unless there are fewer examples than one
    batch, in which case every batch is the whole (reshuffled) set.
    """
    if count < 1:
        raise ValueError("Invalid training set: it holds no examples")
    if batch_size >= count:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + index))
        return order.tolist()
    per_epoch = count // batch_size
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


__all__ = [
    "Batch",
    "Workload",
    "default_cache_dir",
    "example_indices",
    "to_device",
]
