"""The optimizers the training loop can run, by name: one registry entry per method.

Adding a method (GaLore, BAdam, LoRA, 8-bit AdamW ...) is one :class:`OptimizerSpec` passed to
:func:`register_optimizer`: a builder ``(model, config) -> Optimizer``, and, only when needed, a
``prepare_model`` hook (LoRA wraps the model), ``takes_loss`` (the optimizer wants
``step(loss=...)``) and ``stats`` (numbers for the metrics and the progress bar). The loop never
branches on the optimizer's name.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from blockllm.app.training.config import RunConfig

logger = logging.getLogger(__name__)

Builder = Callable[[nn.Module, "RunConfig"], torch.optim.Optimizer]


def _no_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and drive one optimizer.

    Attributes:
        name: The ``--optimizer`` value.
        build: Makes the optimizer for a model (after ``prepare_model``) and a run config.
        description: One line for ``--help`` and the docs.
        takes_loss: Pass the step's loss as ``optimizer.step(loss=...)`` (BlockLLM's trigger).
        prepare_model: Optional ``(model, config) -> model`` run before ``build`` (adapters).
        stats: ``optimizer -> {name: number}`` logged with every metrics line.
        skipped_steps: ``optimizer -> count`` of the steps the optimizer itself skipped because
            the loss or a gradient was NaN/inf. None (the default) means it does not check, and
            the loop skips such steps for it, so that one bad batch cannot write NaN into the
            weights. An optimizer that checks must see those steps (BlockLLM discards a
            selection scored on bad gradients), so the loop then hands every step to it.
    """

    name: str
    build: Builder
    description: str
    takes_loss: bool = False
    prepare_model: Callable[[nn.Module, RunConfig], nn.Module] | None = None
    stats: Callable[[torch.optim.Optimizer], dict[str, float]] = field(default=_no_stats)
    skipped_steps: Callable[[torch.optim.Optimizer], int] | None = None


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Add ``spec`` to :data:`OPTIMIZERS`.

    Raises:
        ValueError: the name is taken and ``replace`` is False.
    """
    if spec.name in OPTIMIZERS and not replace:
        raise ValueError(f"Invalid optimizer name: {spec.name!r} is already registered")
    OPTIMIZERS[spec.name] = spec
    return spec


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The registered spec called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return OPTIMIZERS[name]
    except KeyError:
        listed = ", ".join(repr(known) for known in OPTIMIZERS)
        raise ValueError(f"Invalid optimizer: {name!r} (choose from {listed})") from None


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into weight-decayed matrices and undecayed vectors.

    Matrices and embeddings (``ndim >= 2``) decay; norms' scales and biases do not: decaying them
    only pulls activations towards zero (the nanoGPT/GaLore convention). Each group carries the
    parameter names under ``"names"``, which BlockLLM needs and torch optimizers ignore.

    Args:
        model: The model whose ``named_parameters()`` with ``requires_grad`` are grouped.
        weight_decay: Decay of the matrix group.

    Returns:
        One or two param groups (an empty group is left out).
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append((name, param))
    groups = []
    for members, rate in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {
                    "params": [param for _, param in members],
                    "names": [name for name, _ in members],
                    "weight_decay": rate,
                }
            )
    logger.info(
        "Param groups: %d tensors with weight decay %.3g, %d without",
        len(decay), weight_decay, len(no_decay),
    )  # fmt: skip
    return groups


# ---------------------------------------------------------------------- AdamW


def _build_adamw(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    groups = decay_groups(model, config.weight_decay)
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


# ---------------------------------------------------------------------- BlockLLM


def _build_blockllm(model: nn.Module, config: RunConfig, **overrides: Any) -> torch.optim.Optimizer:
    from blockllm.app.training.data_parallel import data_parallel_group
    from blockllm.optim import BlockLLM

    settings: dict[str, Any] = {
        "sparsity": config.sparsity, "patience": config.patience, "trigger": config.trigger,
        "selection": config.selection, "seed": config.seed, "exclude": config.exclude,
        "max_tensor_share": config.max_tensor_share, "partial": config.partial,
        "entry_warmup": config.entry_warmup,
        # The loop clips through BlockLLM.clip_grad_norm_, so the dense gradients of partly
        # selected tensors (embedding and head rows) need not outlive the backward.
        "compact_grads": True,
        # Under torchrun BlockLLM averages its selected gradients itself (no DDP).
        "process_group": data_parallel_group(),
    }  # fmt: skip
    settings.update(overrides)
    optimizer = BlockLLM(
        decay_groups(model, config.weight_decay),
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay, **settings,
    )  # fmt: skip
    # Partly selected embedding and head rows: no dense weight gradient, no full head product.
    optimizer.use_row_gradients(model)
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
    "blockllm-paper": (
        {"selection": "mask", "max_tensor_share": 1.0, "partial": "coordinates",
         "trigger": "loss", "entry_warmup": 0},
        "The paper's method as published: |G| >= tau mask, loss-plateau trigger (--patience)",
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
        )
    )


# ---------------------------------------------------------------------- peers


def _peer(module: str, attribute: str) -> Callable[..., Any]:
    """``blockllm.app.methods.peer_packages.<module>.<attribute>``, imported at the first call.

    Registering by name keeps the peers' packages (and the adapters) out of every import of this
    registry: only the method that is built imports its package.
    """

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f"blockllm.app.methods.{module}"), attribute)(*args)

    call.__name__ = f"{module}.{attribute}"
    return call


register_optimizer(
    OptimizerSpec(
        name="lisa",
        build=_peer("lisa", "build"),
        description="LISA: AdamW on the embedding, head and a few random layers, changed every "
        "--patience steps",
        stats=_peer("lisa", "stats"),
    )
)
register_optimizer(
    OptimizerSpec(
        name="badam",
        build=_peer("badam", "build"),
        description="BAdam (pip install badam): one block at a time, switched every --patience steps",
        stats=_peer("badam", "stats"),
    )
)
register_optimizer(
    OptimizerSpec(
        name="galore",
        build=_peer("galore", "build"),
        description="GaLore (pip install galore-torch): Adam on low-rank projected gradients",
    )
)
register_optimizer(
    OptimizerSpec(
        name="lora",
        build=_peer("lora", "build"),
        prepare_model=_peer("lora", "prepare_model"),
        description="LoRA (pip install peft): rank-16 adapters on every linear layer, AdamW",
        stats=_peer("lora", "stats"),
    )
)
register_optimizer(
    OptimizerSpec(
        name="adamw-8bit",
        build=_peer("adamw8bit", "build"),
        description="8-bit AdamW (pip install bitsandbytes): block-wise quantized moments",
    )
)


def missing_package(name: str) -> str | None:
    """Why method ``name`` cannot be built here (a missing package and its install line), or None."""
    from blockllm.app.methods.peer_packages import missing_requirement

    return missing_requirement(name)


__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "decay_groups",
    "get_optimizer_spec",
    "missing_package",
    "register_optimizer",
]
