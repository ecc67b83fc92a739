"""How the ``blockllm`` command behaves as one of several ``torchrun`` processes.

Rank 0 speaks for the run: its log lines, progress, summary and interruption message are the
run's. Other ranks log only errors (every line says which rank wrote it), so a failure on any
machine is still seen. After a collective fails, torchrun sends SIGTERM to the surviving ranks
within a fraction of a second; :func:`report_before_teardown` keeps that signal from killing a
rank before it has printed why it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from blockllm.app.training.data_parallel import DataParallel, launch_info
from blockllm.app.training.run_errors import STOP_SIGNALS


def configure_rank_logging(level: str) -> None:
    """Under torchrun: prefix log lines with the rank; ranks other than 0 show errors only."""
    info = launch_info()
    if info is None:
        return
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RankFormatter(handler.formatter, f"[rank {info.rank}] "))
    if info.rank != 0 and level != "debug":
        logging.getLogger().setLevel(logging.ERROR)


class _RankFormatter(logging.Formatter):
    """Another formatter's lines, each with the rank in front."""

    def __init__(self, inner: logging.Formatter | None, prefix: str) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return self._prefix + self._inner.format(record)


@contextlib.contextmanager
def report_before_teardown(parallel: DataParallel) -> Iterator[None]:
    """While running data parallel, ignore SIGINT/SIGTERM/SIGHUP once a peer failure was detected.

    Until then the signals behave as before (the training run turns the first one into "checkpoint
    and stop"). Afterwards the process is only printing its one-line error and exiting, so the
    signals stay ignored to the end; torchrun still SIGKILLs a worker that does not exit.
    """
    if not parallel.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handler(signum: int, frame: Any) -> None:
        if parallel.failed:
            return  # the error line is on its way; exit follows
        before = previous[signum]
        if callable(before):
            before(signum, frame)
            return
        signal.signal(signum, before if before is not None else signal.SIG_DFL)
        signal.raise_signal(signum)

    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            if parallel.failed:
                # Not a Python handler: the interpreter resets those to SIG_DFL while it shuts
                # down, and torchrun's SIGTERM would then replace exit code 3 with -15.
                signal.signal(signum, signal.SIG_IGN)
            else:
                signal.signal(signum, before if before is not None else signal.SIG_DFL)


__all__ = ["configure_rank_logging", "report_before_teardown"]
