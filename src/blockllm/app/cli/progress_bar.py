"""The terminal progress bar of a training run (tqdm), and the choice between bar, log and nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from blockllm.app.training.progress import LogProgress, Progress, describe


class TqdmProgress:
    """``tiny/blockllm  42%|████▏     | 84/200 [00:20<00:27, loss 5.1 | 4,100 tok/s | rss 900 MB | resel 2]``.

    Args:
        description: Shown left of the bar (model and optimizer).
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self._bar: Any = None

    def start(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        # A pseudo-terminal without a size (CI runners, `script`) reports 0 x 0, and tqdm then
        # hides the bar as "below the screen": fall back to a fixed size there.
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except (OSError, ValueError):
            size = os.terminal_size((0, 0))
        width: dict[str, Any] = (
            {"dynamic_ncols": True}
            if size.columns > 0 and size.lines > 0
            else {"ncols": 120, "nrows": 24}
        )
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=self.description,
            unit="step",
            file=sys.stderr,
            leave=True,
            **width,
        )

    def update(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(describe(record), refresh=False)
        self._bar.update(record["step"] - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Silent:
    def start(self, total: int, initial: int) -> None:
        pass

    def update(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, description: str) -> Progress:
    """``bar`` (tqdm), ``log`` (a line every ~5 %), ``off``, or ``auto`` = bar on a terminal."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode == "bar":
        try:
            import tqdm  # noqa: F401
        except ImportError:
            logging.getLogger(__name__).warning(
                "No progress bar: the 'tqdm' package is missing (pip install tqdm)"
            )
            return LogProgress()
        return TqdmProgress(description)
    if mode == "log":
        return LogProgress()
    return _Silent()


@contextlib.contextmanager
def logging_around_bar() -> Iterator[None]:
    """Route log lines through tqdm so they do not tear the bar apart."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        yield
        return
    with logging_redirect_tqdm():
        yield


__all__ = ["TqdmProgress", "logging_around_bar", "make_progress"]
