"""Run checkpoints: atomic writes, the last few kept, safe loads, and RNG state capture.

A checkpoint is one ``torch.save`` file, ``DIR/checkpoints/step_00000123.pt``, holding the model,
the optimizer, the LR scheduler, every RNG state, the step, and the run's counters. It is written
to a temporary file in the same directory, fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX and Windows), so a crash or a second Ctrl-C during a save
leaves the previous checkpoints intact and never a half-written one under a checkpoint name.
Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from blockllm.train.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "blockllm-run-checkpoint"
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"step_(\d{8,})\.pt")
_TEMP_PREFIX = ".tmp-"


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``directory``, oldest first (none if it is missing)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    directory: str | Path, step: int, payload: dict[str, Any], *, keep: int
) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` atomically, then keep only the last ``keep``.

    Args:
        directory: The checkpoints folder (created if needed).
        step: Completed optimizer steps; names the file.
        payload: Tensors and plain Python values only, so ``weights_only`` loading works.
        keep: How many of the newest checkpoints survive (at least 1).

    Returns:
        The checkpoint's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    temp = directory / f"{_TEMP_PREFIX}{final.name}.{os.getpid()}"
    record = {"kind": CHECKPOINT_KIND, "format": CHECKPOINT_FORMAT, "step": int(step), **payload}
    try:
        with open(temp, "wb") as handle:
            torch.save(record, handle)
            handle.flush()
            # Without fsync a power cut after the rename can leave an empty file under the final
            # name: the rename reaches the disk before the data does on some filesystems.
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_directory(directory)
    finally:
        if temp.exists():
            temp.unlink()
    _prune(directory, keep)
    logger.info("Saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, not a blockllm checkpoint, or from an
            unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: "
            f"{_first_line(exc)}); delete it to resume from an older one"
        ) from exc
    if not isinstance(record, dict) or record.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a blockllm run checkpoint")
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {record.get('format')!r}; this blockllm reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    return record


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state training touches: Python's, torch's CPU one, and each CUDA device's."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(directory: Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[: -max(1, keep)]:
        path.unlink(missing_ok=True)
        logger.debug("Removed old checkpoint %s", path)
    # Leftovers of saves killed with SIGKILL are never a checkpoint; drop them too.
    for path in directory.glob(f"{_TEMP_PREFIX}*"):
        if not path.name.endswith(f".{os.getpid()}"):
            path.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's can run to several lines)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return ""
    return lines[0].split(". ")[0].rstrip(".")[:200]


__all__ = [
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]
