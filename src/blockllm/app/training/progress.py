"""How the loop reports progress: a small protocol, and a logging implementation.

The training loop never writes to the terminal itself. The CLI passes a progress bar (see
:mod:`blockllm.app.cli.progress_bar`); without one, :class:`LogProgress` logs a line now and then.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """Receives every metrics record of the run."""

    def start(self, total: int, initial: int) -> None:
        """Training goes from step ``initial`` to ``total``."""
        ...

    def update(self, record: dict[str, Any]) -> None:
        """A metrics record (see ``metrics.jsonl``) for step ``record["step"]``."""
        ...

    def close(self) -> None: ...


def describe(record: dict[str, Any]) -> str:
    """The short status shown next to a progress bar: loss, tok/s, memory, reselections."""
    parts = [f"loss {record['loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval {record['eval_loss']:.4f}")
    if "eval_accuracy" in record:
        parts.append(f"acc {record['eval_accuracy']:.3f}")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "peak_cuda_mb" in record:
        parts.append(f"cuda {record['peak_cuda_mb']:,.0f} MB")
    else:
        parts.append(f"rss {record['peak_rss_mb']:,.0f} MB")
    if "num_reselections" in record:
        parts.append(f"resel {record['num_reselections']}")
    return " | ".join(parts)


class LogProgress:
    """Log about twenty lines per run, plus every evaluation."""

    def __init__(self) -> None:
        self._every = 1
        self._total = 0

    def start(self, total: int, initial: int) -> None:
        self._total = total
        self._every = max(1, (total - initial) // 20)
        if initial:
            logger.info("Resuming at step %d of %d", initial, total)

    def update(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step % self._every == 0 or "eval_loss" in record or step == self._total:
            logger.info("step %d/%d | %s", step, self._total, describe(record))

    def close(self) -> None:
        pass


__all__ = ["LogProgress", "Progress", "describe"]
