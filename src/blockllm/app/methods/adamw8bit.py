"""8-bit AdamW (Dettmers et al., 2022) through ``bitsandbytes``: block-wise quantized moments."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from blockllm.app.methods.peer_packages import require_peer
from blockllm.parameter_groups import param_groups

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig


def build(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    bnb = require_peer("adamw-8bit")
    groups = param_groups(model, weight_decay=config.weight_decay, vocab_lr=config.vocab_lr())
    for group in groups:
        group.pop("names")
    return bnb.optim.AdamW8bit(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip


__all__ = ["build"]
