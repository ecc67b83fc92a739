"""The output directory of a run: what may be started, resumed or refused there.

The rules protect existing results; every refusal happens before any file is written:

* a new or empty directory starts a run (``--resume`` there is an error: nothing to resume, and
  the message says whether the directory is missing or holds no checkpoint);
* a directory whose ``config.json`` holds a *different* run is refused, resume or not (with
  ``--resume``, a new ``max_steps`` does not make a different run: the run is trained on to it);
* a directory holding *this* run's metrics or checkpoints needs ``--resume`` (starting over would
  overwrite them); ``--resume`` continues from the last intact checkpoint, or, when the run was
  stopped before its first checkpoint (metrics but no checkpoint), starts it again from step 0,
  which reproduces the same lines;
* ``--resume`` with nothing of this run to continue (no checkpoint, no metrics) is an error;
* a non-empty directory without ``config.json`` is refused (it is not a blockllm run). Leftover
  temporary files of our own atomic writes (a run killed while writing its first ``config.json``)
  do not count: they must not lock the user out of the directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from blockllm.app.training.checkpoint import latest_checkpoint, list_checkpoints
from blockllm.app.training.metrics import METRICS_FILE
from blockllm.app.training.run_config import RunConfig
from blockllm.app.training.run_errors import ConfigError, RunDirError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
_TEMP_INFIX = ".tmp-"
_CONFIG_TEMP_PREFIX = f".{CONFIG_FILE}{_TEMP_INFIX}"


@dataclass(frozen=True)
class RunDir:
    """A checked run directory.

    Attributes:
        path: The directory.
        resume_from: The newest checkpoint to continue from, or None for a fresh start. The
            training run verifies it and falls back to an older one when it is damaged.
        restart: ``--resume`` of a run that stopped before its first checkpoint: it starts from
            step 0 and its partial outputs are replaced.
    """

    path: Path
    resume_from: Path | None
    restart: bool = False

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
    entries = [
        name
        for name in (sorted(os.listdir(path)) if path.is_dir() else [])
        if not name.startswith(_CONFIG_TEMP_PREFIX)
    ]
    previous = saved_config(path)

    if previous is None and entries:
        raise RunDirError(
            f"output directory {path} is not empty and holds no blockllm run (no {CONFIG_FILE}); "
            "choose a new or empty --output-dir"
        )
    if previous is not None:
        # --resume may train the run longer (a new max_steps); starting over may change nothing.
        changed = config.resume_conflicts(previous) if resume else config.differences(previous)
        if changed:
            shown = "; ".join(
                f"{name}: {theirs!r} there, {mine!r} now"
                for name, (mine, theirs) in changed.items()
            )
            if resume:
                hint = ""
            elif set(changed) == {"max_steps"}:
                hint = f", or add --resume to continue it up to step {config.max_steps}"
            else:
                hint = ", or --resume alone to continue it with its saved settings"
            raise RunDirError(
                f"output directory {path} holds a different run ({shown}); choose another "
                f"--output-dir{hint}"
            )

    checkpoint = latest_checkpoint(path / CHECKPOINTS_DIR)
    has_results = bool(list_checkpoints(path / CHECKPOINTS_DIR)) or _nonempty(path / METRICS_FILE)
    if resume and checkpoint is None:
        if has_results:
            # Killed before its first checkpoint: neither a fresh start (it would overwrite the
            # metrics) nor a resume would otherwise be allowed. Batches are a pure function of the
            # step, so starting over reproduces the lines it replaces.
            logger.warning(
                "%s holds no checkpoint yet (the run stopped before its first save); starting it "
                "again from step 0",
                path / CHECKPOINTS_DIR,
            )
            return RunDir(path=path, resume_from=None, restart=True)
        if not path.exists():
            # Name the folder that is missing, not a checkpoints/ folder inside it: the usual
            # cause is a typo in --output-dir, or a run that was never started.
            raise RunDirError(
                f"nothing to resume: output directory {path} does not exist; check --output-dir, "
                "or run the same command without --resume to start a new run there"
            )
        hint = "; run the same command without --resume to start it" if previous else ""
        raise RunDirError(f"nothing to resume: {path / CHECKPOINTS_DIR} holds no checkpoint{hint}")
    if not resume and has_results:
        raise RunDirError(
            f"output directory {path} already holds this run's results; pass --resume to continue "
            "it, or choose another --output-dir"
        )

    return RunDir(path=path, resume_from=checkpoint if resume else None)


def init_run_dir(run_dir: RunDir, config: RunConfig) -> None:
    """Create the directory and write ``config.json`` (only when it changes)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    for leftover in run_dir.path.glob(f"{_CONFIG_TEMP_PREFIX}*"):
        # A previous process killed half-way through writing config.json; ours has another name.
        leftover.unlink(missing_ok=True)
    previous = saved_config(run_dir.path)
    if previous is None or config.differences(previous, include_resumable=True):
        write_text_atomic(run_dir.path / CONFIG_FILE, config.to_json())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    temp = path.with_name(f".{path.name}{_TEMP_INFIX}{os.getpid()}")
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
