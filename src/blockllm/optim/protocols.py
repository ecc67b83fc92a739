"""What a training loop may ask of an optimizer beyond ``torch.optim.Optimizer``.

Small typed protocols, so a loop checks ``isinstance(optimizer, ClipsOwnGradients)`` instead of
probing attributes with ``getattr``. :class:`blockllm.BlockLLM` implements all four; other
optimizers implement none and get the loop's standard treatment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ClipsOwnGradients(Protocol):
    """Clips exactly the gradients its next step applies, including any kept outside ``.grad``.

    ``torch.nn.utils.clip_grad_norm_`` sees only ``.grad``; an optimizer that compacts gradients
    (or averages them itself) must be clipped through this method instead.
    """

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        parameters: Iterable[torch.Tensor] | torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class ReportsMemory(Protocol):
    """Counts its own bytes: ``params``, ``grads``, ``optimizer_state``, ``master_weights``."""

    def memory_report(self) -> dict[str, int]: ...


@runtime_checkable
class SyncsItself(Protocol):
    """May average gradients and the loss over a process group itself (data parallel, no DDP).

    When ``process_group`` is not None, a loop must neither wrap the model in DDP nor average
    gradients or the loss: the optimizer does it exactly once, in :meth:`clip_grad_norm_` or
    ``step()``. ``last_loss`` is then the loss averaged over the group at the last step.
    """

    @property
    def process_group(self) -> Any: ...

    @property
    def last_loss(self) -> float | None: ...


@runtime_checkable
class StepsDuringBackward(Protocol):
    """May use (and free) gradients as they land in backward (BlockLLM with a ``rest`` rule).

    Under gradient accumulation a loop wraps every backward of a step but the last in
    ``hold_gradients()``, so that the gradients used are the whole step's.
    """

    def hold_gradients(self) -> contextlib.AbstractContextManager[None]: ...


__all__ = ["ClipsOwnGradients", "ReportsMemory", "StepsDuringBackward", "SyncsItself"]
