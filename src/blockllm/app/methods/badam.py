"""BAdam (Luo et al., NeurIPS 2024) through its package: block coordinate descent over layers.

``badam.BlockOptimizer`` wraps a base AdamW, trains one block (a transformer layer, or the
embedding, or the head with the other loose parameters) for ``switch_block_every`` steps, keeps an
fp32 master copy of the active block and resets the Adam state on every switch. The package
prints; its output goes to this module's debug log instead of stdout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blockllm.app.methods.peer_packages import require_peer
from blockllm.parameter_groups import param_groups

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet() -> Any:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("badam: %s", buffer.getvalue().strip())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def build(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """A BAdam ``BlockOptimizer`` (random block order, switch every ``patience`` steps)."""
    badam = require_peer("badam")

    class MeasuredBlockOptimizer(badam.BlockOptimizer):  # type: ignore[misc, name-defined]
        """BAdam's optimizer plus the byte counts the loop's memory tracker reads.

        BAdam moves the low-precision gradients into its fp32 copies and frees both inside
        ``step()``, so the gradient bytes are counted on entry to ``step()``, and the fp32
        copies are reported as master weights.
        """

        def step(self, *args: Any, **kwargs: Any) -> Any:
            self.grad_bytes = sum(
                _nbytes(p.grad) for _, p in self.named_parameters_list if p.grad is not None
            )
            with _quiet():
                result = super().step(*args, **kwargs)
            # BAdam switched blocks at the end of this step exactly when this holds.
            if (self.global_step + 1) % self.switch_block_every == 0:
                self.num_reselections += 1
            return result

        @property
        def trainable_fraction(self) -> float:
            total = sum(p.numel() for _, p in self.named_parameters_list)
            active = sum(p.numel() for p in self.param_idx2hp.values())
            return active / total if total else 0.0

        def memory_report(self) -> dict[str, int]:
            unique = {id(p): p for _, p in self.named_parameters_list}.values()
            state = sum(
                _nbytes(value)
                for per_param in self.base_optimizer.state.values()
                for value in per_param.values()
                if isinstance(value, torch.Tensor)
            )
            return {
                "params": sum(_nbytes(p) for p in unique),
                "grads": self.grad_bytes,
                "optimizer_state": state,
                "master_weights": sum(_nbytes(p) for p in self.param_idx2hp.values()),
            }

    base = torch.optim.AdamW(
        param_groups(model, weight_decay=config.weight_decay, vocab_lr=config.vocab_lr()), lr=config.lr,
        betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay,
    )  # fmt: skip
    with _quiet(), warnings.catch_warnings():
        # BAdam warns about fp32 weights (it expects bf16 with fp32 masters); fp32 is the CPU
        # default here, and its masters are counted under master_weights.
        warnings.filterwarnings("ignore", message="BAdam expect", category=UserWarning)
        optimizer = MeasuredBlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=config.patience,
            switch_mode="random", include_embedding=True, include_lm_head=True, verbose=0,
        )  # fmt: skip
    optimizer.grad_bytes = 0
    optimizer.num_reselections = 0
    return optimizer


def stats(optimizer: Any) -> dict[str, float]:
    return {
        "num_reselections": optimizer.num_reselections,
        "trainable_fraction": optimizer.trainable_fraction,
    }


__all__ = ["build", "stats"]
