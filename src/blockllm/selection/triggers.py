"""When to reselect: small objects that watch the training loss and keep their own state."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Trigger(Protocol):
    """Decides, from the observed losses, when to reselect. Plug in your own as ``trigger=``.

    ``observe`` is called once per optimizer step (with the step's loss, or None when no loss was
    given) and returns True to start a reselection; the optimizer then calls ``reset``.
    ``state_dict``/``load_state_dict`` round-trip everything it needs to resume.
    """

    needs_loss: bool

    def observe(self, loss: float | None) -> bool: ...

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LossPlateauTrigger:
    """The paper's trigger: reselect once the loss stops falling below its moving average.

    After at least ``patience`` observations since the last selection, fire when the current loss
    is not below the mean of the last ``patience`` losses (the current one included). Observations
    restart from zero after each selection, so it never fires more than once per ``patience``
    steps, even on a loss that plateaus forever.
    """

    needs_loss = True

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.window: deque[float] = deque(maxlen=patience)
        self.observed = 0

    def observe(self, loss: float | None) -> bool:
        if loss is None:
            return False
        self.window.append(loss)
        self.observed += 1
        if self.observed < self.patience:
            return False
        return loss >= math.fsum(self.window) / len(self.window)

    def reset(self) -> None:
        self.window.clear()
        self.observed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "observed": self.observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque((float(x) for x in state["window"]), maxlen=self.patience)
        self.observed = int(state["observed"])


class IntervalTrigger:
    """Reselect every ``patience`` steps, whatever the loss does (the authors' GLUE code path)."""

    needs_loss = False

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.observed = 0

    def observe(self, loss: float | None) -> bool:
        self.observed += 1
        return self.observed >= self.patience

    def reset(self) -> None:
        self.observed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"window": [], "observed": self.observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.observed = int(state["observed"])


def loss_value(loss: Any) -> float:
    """A step's loss as a float, from a scalar tensor or a number; named errors otherwise."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"Invalid loss: expected a scalar, got a tensor of shape {tuple(loss.shape)}"
            )
        return float(loss.detach().item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"Invalid loss: expected a float or a scalar tensor, got {type(loss).__name__}")


TRIGGERS = {"loss": LossPlateauTrigger, "interval": IntervalTrigger}


def make_trigger(spec: str | Trigger, patience: int) -> Trigger:
    """The trigger ``spec`` names (built with ``patience``), or ``spec`` itself when an object.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(spec, str):
        return spec
    if spec not in TRIGGERS:
        raise ValueError(f"Invalid trigger: {spec!r} (choose from {', '.join(map(repr, TRIGGERS))})")
    return TRIGGERS[spec](patience)
