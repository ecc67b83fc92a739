"""Checkpoints of FSDP2 (``fully_shard``) models trained with BlockLLM, through DCP.

``torch.distributed.checkpoint`` (DCP) saves each rank's shards in parallel and can load them on
a different number of ranks. BlockLLM's optimizer state is not shaped like torch's Adam state
(moments exist only for the selection, and a partly selected tensor keeps compact moments for
the coordinates in each shard), so it goes through :mod:`blockllm.distributed.fsdp2_state`: sharded
moments as DTensors, the rest in one small entry that is the same on every rank.

Every function here is collective: call it on all ranks.

Example:
    >>> from blockllm.distributed.fsdp2_checkpoint import load_checkpoint, save_checkpoint
    >>> save_checkpoint("ckpt/step-100", model, optimizer)
    >>> # later, in fresh processes, after fully_shard and BlockLLM(...) as before:
    >>> load_checkpoint("ckpt/step-100", model, optimizer)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch.distributed.checkpoint as dcp

from blockllm.distributed.fsdp2_state import (
    META_KEY,
    STATE_KEY,
    load_sharded_state_dict,
    read_meta,
    sharded_state_dict,
    state_skeleton,
)

if TYPE_CHECKING:
    from torch import nn

    from blockllm.optim.blockllm import BlockLLM

logger = logging.getLogger(__name__)

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"


def optimizer_state_dict(optimizer: BlockLLM) -> dict[str, Any]:
    """BlockLLM's state as an entry of a DCP state dict (for checkpoints you assemble yourself).

    Put it under any key of the dict you pass to ``dcp.save``, and restore it with
    :func:`load_optimizer_state_dict` and the same key.
    """
    return sharded_state_dict(optimizer)


def load_optimizer_state_dict(
    optimizer: BlockLLM, checkpoint_id: str | os.PathLike[str], key: str = OPTIMIZER_KEY
) -> None:
    """Restore BlockLLM from the entry ``key`` of a DCP checkpoint.

    Two reads: the small replicated entry first, since it says which tensors hold moments and
    so which DTensors to allocate for the second.
    """
    _load_optimizer(optimizer, checkpoint_id, key, extra=None)


def save_checkpoint(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: BlockLLM
) -> None:
    """Save the sharded model (``"model"``) and BlockLLM (``"optimizer"``) with DCP."""
    dcp.save(
        {MODEL_KEY: model.state_dict(), OPTIMIZER_KEY: optimizer_state_dict(optimizer)},
        checkpoint_id=checkpoint_id,
    )
    logger.info("saved an FSDP2 BlockLLM checkpoint to %s", checkpoint_id)


def load_checkpoint(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: BlockLLM
) -> None:
    """Load what :func:`save_checkpoint` saved into a model sharded the same way (any rank count).

    Build the model (``fully_shard`` as before) and the optimizer with the same arguments first;
    training then continues exactly where the saved run was.
    """
    model_state = model.state_dict()
    _load_optimizer(optimizer, checkpoint_id, OPTIMIZER_KEY, extra={MODEL_KEY: model_state})
    model.load_state_dict(model_state)
    logger.info("loaded an FSDP2 BlockLLM checkpoint from %s", checkpoint_id)


def _load_optimizer(
    optimizer: BlockLLM,
    checkpoint_id: str | os.PathLike[str],
    key: str,
    extra: dict[str, Any] | None,
) -> None:
    head: dict[str, Any] = {key: {META_KEY: b""}}
    dcp.load(head, checkpoint_id=checkpoint_id)
    meta = read_meta(head[key][META_KEY])
    body: dict[str, Any] = {key: {STATE_KEY: state_skeleton(optimizer, meta)}}
    if extra:
        body.update(extra)
    # The model's tensors (in `extra`) load in the same read as the moments.
    dcp.load(body, checkpoint_id=checkpoint_id)
    load_sharded_state_dict(optimizer, meta, body[key][STATE_KEY])
