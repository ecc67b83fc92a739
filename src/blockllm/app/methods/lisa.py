"""LISA (Pan et al., 2024): a few random transformer layers trainable at a time, AdamW on them.

Every ``interval`` steps a fresh random set of ``num_active`` layers is made trainable; every
parameter outside the layers (embedding, final norm, head) is always trainable, as in LISA's
"E+H" setting. Unlike LMFlow's callback, which only flips ``requires_grad`` and keeps the Adam
state of every layer it ever activated (LMFlow #729, #768), a layer that leaves the active set
here loses its gradient and its optimizer state at once, so memory stays that of the active set.
Written for the benchmarks from the paper's description; no code of the original is used.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig

logger = logging.getLogger(__name__)

# "model.layers.3.self_attn.q_proj.weight" -> "model.layers.3" (Llama, Gemma, Qwen, Mistral ...).
_LAYER = re.compile(r"^((?:.*?\.)?layers?\.\d+)\.")


class LISA(torch.optim.AdamW):
    """AdamW over the always-trainable parameters and a random, periodically changed set of layers.

    Args:
        named_params: ``(name, parameter)`` pairs; layers are found from the names.
        num_active: Layers trainable at a time.
        interval: Steps between layer switches.
        seed: Seeds the layer choice (independent of torch's global RNG).
        **adamw: Passed to :class:`torch.optim.AdamW` (``lr``, ``betas``, ``weight_decay`` ...).

    Raises:
        ValueError: ``num_active`` or ``interval`` is below 1, or no name looks like a layer.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        *,
        num_active: int = 1,
        interval: int = 20,
        seed: int = 0,
        **adamw: Any,
    ) -> None:
        if num_active < 1:
            raise ValueError(f"Invalid num_active: {num_active} (must be >= 1)")
        if interval < 1:
            raise ValueError(f"Invalid interval: {interval} (must be >= 1)")
        named = [(name, param) for name, param in named_params if param.requires_grad]
        self.layers: dict[str, list[nn.Parameter]] = {}
        for name, param in named:
            match = _LAYER.match(name)
            if match:
                self.layers.setdefault(match.group(1), []).append(param)
        if not self.layers:
            raise ValueError(
                "Invalid parameters for LISA: no name matches '[<prefix>.]layers.<N>.'"
            )
        self.num_active = min(num_active, len(self.layers))
        self.interval = interval
        self.num_reselections = 0
        self._steps = 0
        self._generator = torch.Generator().manual_seed(seed)
        self.active: list[str] = []
        # Every parameter stays in the param groups for the whole run (state_dict positions and LR
        # schedulers rely on that); only requires_grad and the state change.
        decay = [param for _, param in named if param.ndim >= 2]
        no_decay = [param for _, param in named if param.ndim < 2]
        weight_decay = adamw.pop("weight_decay", 0.0)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        super().__init__(groups, weight_decay=weight_decay, **adamw)
        self._total = sum(param.numel() for _, param in named)
        self._switch()

    @property
    def trainable_fraction(self) -> float:
        """Share of the parameters' coordinates trainable now."""
        trainable = sum(
            p.numel() for group in self.param_groups for p in group["params"] if p.requires_grad
        )
        return trainable / self._total if self._total else 0.0

    def _switch(self) -> None:
        """Draw the next active layers; free the gradients and state of the others."""
        names = list(self.layers)
        order = torch.randperm(len(names), generator=self._generator).tolist()
        self.active = sorted(names[index] for index in order[: self.num_active])
        for name, params in self.layers.items():
            trainable = name in self.active
            for param in params:
                param.requires_grad_(trainable)
                if not trainable:
                    param.grad = None
                    self.state.pop(param, None)  # a frozen layer holds no Adam state
        logger.debug("LISA: active layers %s", self.active)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW step on the trainable parameters, then a layer switch when one is due."""
        loss = super().step(closure)
        self._steps += 1
        if self._steps % self.interval == 0:
            self._switch()
            self.num_reselections += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lisa"] = {
            "active": list(self.active),
            "steps": self._steps,
            "num_reselections": self.num_reselections,
            "generator": self._generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        lisa = state_dict.pop("lisa", None)
        if lisa is not None:
            self._steps = int(lisa["steps"])
            self.num_reselections = int(lisa["num_reselections"])
            self._generator.set_state(lisa["generator"])
            self.active = list(lisa["active"])
            for name, params in self.layers.items():
                for param in params:
                    param.requires_grad_(name in self.active)
        super().load_state_dict(state_dict)


def build(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """LISA for a run: ``ceil((1 - sparsity) * layers)`` active layers, switched every ``patience``.

    Reusing BlockLLM's two knobs keeps the comparison at the same trainable share of the blocks
    and the same number of steps between switches.
    """
    if config.vocab_lr() is not None:
        raise ValueError(
            f"Invalid vocab_lr_scale for lisa: {config.vocab_lr_scale} (LISA keeps one lr for "
            "every tensor; use 1)"
        )
    num_layers = len({m.group(1) for n, _ in model.named_parameters() if (m := _LAYER.match(n))})
    num_active = max(1, math.ceil((1.0 - config.sparsity) * num_layers))
    return LISA(
        model.named_parameters(), num_active=num_active, interval=config.patience,
        seed=config.seed, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip


def stats(optimizer: Any) -> dict[str, float]:
    return {
        "num_reselections": optimizer.num_reselections,
        "trainable_fraction": optimizer.trainable_fraction,
    }


__all__ = ["LISA", "build", "stats"]
