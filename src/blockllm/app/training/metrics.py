"""Metrics output: ``DIR/metrics.jsonl`` (the source of truth) mirrored to TensorBoard.

Each line of ``metrics.jsonl`` is one JSON object for one logged step, with at least ``step``,
``loss``, ``lr`` and ``tokens_per_s`` and, on evaluation steps, ``eval_loss``. A resumed run first
cuts the file back to the checkpoint's step, so that after the resume it holds exactly the lines of
an uninterrupted run; TensorBoard gets the same treatment through ``purge_step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Append metric records to ``metrics.jsonl`` and TensorBoard.

    Args:
        output_dir: The run directory.
        resume_step: When resuming, the checkpoint's step: later lines are dropped first.
        tensorboard: Also write TensorBoard event files (skipped, with one warning, when the
            ``tensorboard`` package is missing).
    """

    def __init__(
        self, output_dir: str | Path, *, resume_step: int | None, tensorboard: bool
    ) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # the run directory checks made sure it was this run's, step 0
        self._handle = open(self.path, "a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            self._tensorboard = _open_tensorboard(
                self.output_dir / TENSORBOARD_DIR,
                None if resume_step is None else resume_step + 1,
            )

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (it must hold ``step``)."""
        self._handle.write(json.dumps(record) + "\n")
        # Flush every line: a run killed with SIGKILL still leaves everything up to its last step.
        self._handle.flush()
        if self._tensorboard is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self._tensorboard.add_scalar(_tensorboard_tag(key), value, step)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars that are not a training step's line (the initial evaluation): TensorBoard only."""
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(_tensorboard_tag(key), value, step)

    def sync(self) -> None:
        """Make every line written so far durable (called before each checkpoint)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of a run directory holding one).

    A last line cut short by a crash is ignored rather than raising.

    Raises:
        FileNotFoundError: there is no metrics file.
        ValueError: a line other than the last is not JSON.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is this a blockllm run directory?)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("Ignoring the truncated last line of %s", path)
                break
            raise ValueError(f"{path} line {number} is not valid JSON ({exc.msg})") from exc
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop every line of ``path`` whose step is after ``step``; return how many were kept.

    The file is rewritten through a temporary file and a rename, so a crash here leaves either the
    old or the new file, never a mix.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept = [json.dumps(record) for record in read_metrics(path) if int(record["step"]) <= step]
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temp, path)
    return len(kept)


def _tensorboard_tag(key: str) -> str:
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    return "train/" + key


def _open_tensorboard(log_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning(
            "TensorBoard event files are not written: the 'tensorboard' package is missing. "
            "Install it with: pip install tensorboard"
        )
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def perplexity(loss: float) -> float:
    """``exp(loss)``, as ``inf`` instead of an overflow error for a diverged run."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


__all__ = ["METRICS_FILE", "MetricsWriter", "perplexity", "read_metrics", "truncate_metrics"]
