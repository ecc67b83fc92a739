"""GaLore (Zhao et al., ICML 2024) through ``galore-torch``: Adam in a low-rank gradient subspace.

GaLore's recipe: the projection applies to the attention and MLP matrices (rank = a quarter of
the smaller side, as its 60M config's 128 of 512; projector refreshed every 200 steps; scale
0.25); the embedding, norms and head get plain AdamW. The projector keeps its matrix on a Python
object in the optimizer state, which :func:`blockllm.app.training.memory.tensor_bytes` counts too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blockllm.app.methods.peer_packages import require_peer
from blockllm.parameter_groups import vocabulary_parameters

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig

UPDATE_PROJ_GAP = 200
SCALE = 0.25


def build(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    galore_torch = require_peer("galore")
    vocab_lr = config.vocab_lr()
    vocabulary = vocabulary_parameters(model) if vocab_lr is not None else set()
    projected: list[nn.Parameter] = []
    regular: list[nn.Parameter] = []
    vocab: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        low_rank = param.ndim == 2 and any(key in name for key in ("attn", "mlp", "attention"))
        if id(param) in vocabulary:
            vocab.append(param)
        else:
            (projected if low_rank else regular).append(param)
    rank = max(1, min(min(p.shape) for p in projected) // 4) if projected else 1
    groups: list[dict[str, Any]] = [{"params": regular}]
    if vocab:
        groups.append({"params": vocab, "lr": vocab_lr})
    if projected:
        groups.append(
            {"params": projected, "rank": rank, "update_proj_gap": UPDATE_PROJ_GAP,
             "scale": SCALE, "proj_type": "std"}
        )  # fmt: skip
    return galore_torch.GaLoreAdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip


__all__ = ["build"]
