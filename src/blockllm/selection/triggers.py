"""When to reselect: small objects that watch the training loss and keep their own state."""

from __future__ import annotations

import math
from collections import deque
from typing import Any


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


def make_trigger(kind: str, patience: int) -> LossPlateauTrigger | IntervalTrigger:
    if kind == "loss":
        return LossPlateauTrigger(patience)
    return IntervalTrigger(patience)
