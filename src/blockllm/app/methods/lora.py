"""LoRA (Hu et al., 2021) through ``peft``: low-rank adapters on every linear layer, AdamW on them.

Pretraining (from random weights) follows the convention of GaLore's low-rank baselines: the
adapters replace the updates of the linear layers, and everything else (embedding, norms, head) is
trained in full. Finetuning trains the adapters and a classification head, when there is one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blockllm.app.methods.peer_packages import require_peer
from blockllm.parameter_groups import param_groups

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig

RANK = 16
ALPHA = 32
_HEADS = ("classifier", "score")


def prepare_model(model: nn.Module, config: RunConfig) -> nn.Module:
    peft = require_peer("lora")
    lora_config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"
    )
    wrapped = peft.get_peft_model(model, lora_config)
    for name, param in wrapped.named_parameters():
        if "lora_" in name:
            continue
        wrapped_linear = ".base_layer." in name
        if config.command == "pretrain" and not wrapped_linear:
            param.requires_grad_(True)
        elif config.command == "finetune" and any(f".{head}." in name for head in _HEADS):
            param.requires_grad_(True)
    return wrapped


def build(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay=config.weight_decay, vocab_lr=config.vocab_lr())
    for group in groups:
        group.pop("names")
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer.trainable_fraction = trainable / total if total else 0.0  # type: ignore[attr-defined]
    return optimizer


def stats(optimizer: Any) -> dict[str, float]:
    return {"trainable_fraction": optimizer.trainable_fraction}


__all__ = ["build", "prepare_model", "stats"]
