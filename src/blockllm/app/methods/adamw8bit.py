"""8-bit AdamW (Dettmers et al., 2022) through ``bitsandbytes``: block-wise quantized moments."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from blockllm.app.methods.param_groups import decay_groups
from blockllm.app.methods.peer_packages import require_peer

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig


def build(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    bnb = require_peer("adamw-8bit")
    groups = decay_groups(model, config.weight_decay, config.vocab_lr())
    for group in groups:
        group.pop("names")
    return bnb.optim.AdamW8bit(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip


__all__ = ["build"]
