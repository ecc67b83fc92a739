"""``--optimizer adamw``: torch's fused AdamW on every parameter, the baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockllm.app.methods.registry import OptimizerSpec, register_optimizer
from blockllm.parameter_groups import param_groups

if TYPE_CHECKING:
    import torch
    from torch import nn

    from blockllm.app.training.run_config import RunConfig


def _build_adamw(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    import torch  # here, not at import: listing the methods (`--help`) needs no torch

    groups = param_groups(model, weight_decay=config.weight_decay, vocab_lr=config.vocab_lr())
    for group in groups:
        group.pop("names")  # torch.optim keeps unknown keys in every state_dict; keep it lean
    params = [param for group in groups for param in group["params"]]
    # The fused kernel is the fastest AdamW on CPU and CUDA alike (one kernel for all tensors).
    fused = all(
        param.device.type in ("cpu", "cuda") and param.is_floating_point() for param in params
    )
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay, fused=fused or None,
    )  # fmt: skip


register_optimizer(
    OptimizerSpec(
        name="adamw",
        build=_build_adamw,
        description="torch.optim.AdamW (fused), every parameter trained: the baseline",
    )
)
