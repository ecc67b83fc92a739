"""The output directory of a run: what may be started, resumed or refused there.

The rules protect existing results; every refusal happens before any file is written:

* a new or empty directory starts a run (``--resume`` there is an error: nothing to resume);
* a directory whose ``config.json`` holds a *different* run is refused, resume or not;
* a directory holding *this* run's metrics or checkpoints needs ``--resume`` (starting over would
  overwrite them), and ``--resume`` needs a checkpoint;
* a non-empty directory without ``config.json`` is refused (it is not a blockllm run).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from blockllm.train.checkpoint import latest_checkpoint, list_checkpoints
from blockllm.train.config import RunConfig
from blockllm.train.errors import ConfigError, RunDirError
from blockllm.train.metrics import METRICS_FILE

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RunDir:
    """A checked run directory.

    Attributes:
        path: The directory.
        resume_from: The checkpoint to continue from, or None for a fresh start.
    """

    path: Path
    resume_from: Path | None

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR


def saved_config(output_dir: str | Path) -> RunConfig | None:
    """The ``config.json`` of ``output_dir``, or None when there is none.

    Raises:
        RunDirError: the file exists but is not a valid config.
    """
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return RunConfig.from_json(path)
    except ConfigError as exc:
        raise RunDirError(f"{path} cannot be read ({exc}); choose another --output-dir") from exc


def check_run_dir(output_dir: str | Path, config: RunConfig, *, resume: bool) -> RunDir:
    """Check ``output_dir`` against the rules above; write nothing.

    Writing waits for :func:`init_run_dir`, after data and model loaded: a run that fails in
    setup (a missing data file) must not leave a ``config.json`` that blocks the corrected rerun.

    Args:
        output_dir: The run directory.
        config: This run's config.
        resume: The user asked to continue from the last checkpoint.

    Returns:
        The directory and the checkpoint to resume from.

    Raises:
        RunDirError: the directory cannot take this run.
    """
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output directory {path} exists and is not a directory")
    entries = sorted(os.listdir(path)) if path.is_dir() else []
    previous = saved_config(path)

    if previous is None and entries:
        raise RunDirError(
            f"output directory {path} is not empty and holds no blockllm run (no {CONFIG_FILE}); "
            "choose a new or empty --output-dir"
        )
    if previous is not None:
        changed = config.differences(previous)
        if changed:
            shown = "; ".join(
                f"{name}: {theirs!r} there, {mine!r} now"
                for name, (mine, theirs) in changed.items()
            )
            hint = "" if resume else ", or --resume alone to continue it with its saved settings"
            raise RunDirError(
                f"output directory {path} holds a different run ({shown}); choose another "
                f"--output-dir{hint}"
            )

    checkpoint = latest_checkpoint(path / CHECKPOINTS_DIR)
    has_results = bool(list_checkpoints(path / CHECKPOINTS_DIR)) or _nonempty(path / METRICS_FILE)
    if resume and checkpoint is None:
        raise RunDirError(f"nothing to resume: {path / CHECKPOINTS_DIR} holds no checkpoint")
    if not resume and has_results:
        raise RunDirError(
            f"output directory {path} already holds this run's results; pass --resume to continue "
            "it, or choose another --output-dir"
        )

    return RunDir(path=path, resume_from=checkpoint if resume else None)


def init_run_dir(run_dir: RunDir, config: RunConfig) -> None:
    """Create the directory and write ``config.json`` (only when it changes)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    previous = saved_config(run_dir.path)
    if previous is None or config.differences(previous, include_resumable=True):
        write_text_atomic(run_dir.path / CONFIG_FILE, config.to_json())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "SUMMARY_FILE",
    "RunDir",
    "check_run_dir",
    "init_run_dir",
    "saved_config",
    "write_text_atomic",
]
