"""``--optimizer blockllm`` and its ablations (``blockllm-0.95``, ``blockllm-random`` ...).

Every variant builds :class:`blockllm.BlockLLM` from the run config, with one setting fixed.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from blockllm.app.methods.registry import OptimizerSpec, register_optimizer
from blockllm.parameter_groups import param_groups

if TYPE_CHECKING:  # torch loads when a method is built, not when the names are listed
    import torch
    from torch import nn

    from blockllm.app.training.run_config import RunConfig


def _build_blockllm(model: nn.Module, config: RunConfig, **overrides: Any) -> torch.optim.Optimizer:
    from blockllm.app.training.data_parallel import data_parallel_group
    from blockllm.optim import BlockLLM
    from blockllm.optim.row_gradients import RowGradients

    optimizer = BlockLLM(
        param_groups(model, weight_decay=config.weight_decay, vocab_lr=config.vocab_lr()),
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay, config=config.blockllm_config(),
        # The loop clips through BlockLLM.clip_grad_norm_, so the dense gradients of partly
        # selected tensors (embedding and head rows) need not outlive the backward.
        compact_grads=True,
        # Under torchrun BlockLLM averages its selected gradients itself (no DDP).
        process_group=data_parallel_group(),
        **overrides,
    )  # fmt: skip
    # Partly selected embedding and head rows: no dense weight gradient, no full head product.
    RowGradients(model, optimizer)
    return optimizer


def _blockllm_stats(optimizer: Any) -> dict[str, float]:
    return {
        "num_reselections": optimizer.num_reselections,
        "num_selected": optimizer.num_selected,
        "trainable_fraction": optimizer.trainable_fraction,
        "selection_seconds": optimizer.selection_seconds,
        "num_skipped_steps": optimizer.num_skipped_steps,
    }


register_optimizer(
    OptimizerSpec(
        name="blockllm",
        build=_build_blockllm,
        description="BlockLLM: Adam on a gradient-selected (1 - sparsity) share of coordinates",
        takes_loss=True,
        stats=_blockllm_stats,
        skipped_steps=lambda optimizer: int(optimizer.num_skipped_steps),
        keeps_masters=True,
    )
)


# BlockLLM's ablations, one name each, so that every variant runs in its own process under the
# same flags. Each fixes one setting and takes the rest from the run config.
_BLOCKLLM_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "blockllm-0.95": ({"sparsity": 0.95}, "BlockLLM at sparsity 0.95 (whatever --sparsity says)"),
    "blockllm-random": (
        {"score": "random"},
        "BlockLLM ablation: random tensors instead of gradient-selected ones, same budget",
    ),
    "blockllm-cyclic": (
        {"score": "cyclic"},
        "BlockLLM with FRUGAL's cyclic order (the least-selected tensors first, from the output "
        "down) instead of gradient scores",
    ),
    "blockllm-keep-moments": (
        {"keep_moments": True},
        "BlockLLM keeping a leaving tensor's Adam moments for its return (the state grows)",
    ),
    "blockllm-cyclic-keep": (
        {"score": "cyclic", "keep_moments": True},
        "BlockLLM in FRUGAL's cyclic order, keeping each tensor's moments for its next turn",
    ),
    "blockllm-novisit": (
        {"visit_penalty": False},
        "BlockLLM ablation: scores not divided by 1 + times selected",
    ),
    "blockllm-mask": (
        {"selection": "mask"},
        "BlockLLM with the paper's |G| >= tau coordinate mask instead of whole tensors",
    ),
    "blockllm-uncapped": (
        {"max_tensor_share": 1.0, "partial": "coordinates"},
        "BlockLLM ablation: no per-tensor cap, leftover budget as single coordinates (0.1.0 rule)",
    ),
    # Everything the published method fixes is fixed here, the frozen rest included: since
    # 0.5 the run config's --rest defaults to a state-free rule (0.6.2 and earlier left it to
    # the run config, so this name stepped the rest too).
    "blockllm-paper": (
        {"selection": "mask", "max_tensor_share": 1.0, "partial": "coordinates",
         "trigger": "loss", "entry_warmup": 0, "rest": "none"},
        "The paper's method as published: the rest frozen, |G| >= tau mask, loss-plateau "
        "trigger (--patience)",
    ),
}
for _name, (_overrides, _description) in _BLOCKLLM_VARIANTS.items():
    register_optimizer(
        OptimizerSpec(
            name=_name,
            build=functools.partial(_build_blockllm, **_overrides),
            description=_description,
            takes_loss=True,
            stats=_blockllm_stats,
            skipped_steps=lambda optimizer: int(optimizer.num_skipped_steps),
            keeps_masters=True,
        )
    )


def blockllm_knobs(name: str) -> dict[str, Any] | None:
    """The BlockLLM knobs optimizer ``name`` fixes: ``{}`` for ``blockllm``, None for a non-BlockLLM.

    ``blockllm estimate`` reads a variant's memory off these (``blockllm-0.95`` its sparsity,
    ``blockllm-mask`` its coordinate lists).
    """
    if name == "blockllm":
        return {}
    variant = _BLOCKLLM_VARIANTS.get(name)
    return dict(variant[0]) if variant is not None else None
