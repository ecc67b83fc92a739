"""Run checkpoints: atomic, checksummed writes, the last few kept, verified loads, RNG capture.

A checkpoint is one file, ``DIR/checkpoints/step_00000123.pt``: a ``torch.save`` archive holding the
model, the optimizer, the LR scheduler, every RNG state, the step and the run's counters, followed by
one text line, the *trailer*::

    blockllm-checkpoint format=2 blockllm=0.1.0 size=16546296 sha256=9f86d081...

``size`` counts the archive's bytes; ``sha256`` covers the archive and the trailer's fields before it,
so that no byte of the file can change unnoticed. The trailer exists because torch checks no
checksum of tensor data: a flipped bit in a weight loads silently. torch's reader finds the
archive's directory by searching backwards from the end and ignores bytes after it, so the file
stays a plain ``torch.load``-able file (``tests/reliability`` checks this on every torch we test).

Writing goes to a temporary file in the same directory, is fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX and Windows). A crash, a SIGKILL or a full disk during a save
therefore leaves the previous checkpoints intact and never a half-written file under a checkpoint's
name; older checkpoints are pruned only once the new one is complete.

Loading verifies size and checksum before anything is unpickled, then uses
``torch.load(weights_only=True)``: a checkpoint cannot run code. Format 1 (blockllm 0.1.0: the same
archive without a trailer) still loads, unverified. A damaged file raises
:class:`~blockllm.app.training.run_errors.CorruptCheckpointError`, and :func:`load_latest_checkpoint` then
falls back to the next older checkpoint; a file from a newer format raises
:class:`~blockllm.app.training.run_errors.CheckpointVersionError`, which says which release wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from blockllm.app.training.run_errors import (
    CheckpointError,
    CheckpointVersionError,
    CorruptCheckpointError,
)

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "blockllm-run-checkpoint"
CHECKPOINT_FORMAT = 2
# Format 1: blockllm 0.1.0, the archive alone. Format 2: the archive plus the checksum trailer.
READABLE_FORMATS = (1, 2)
CORRUPT_SUFFIX = ".corrupt"
_NAME = re.compile(r"step_(\d{8,})\.pt")
_TEMP_PREFIX = ".tmp-"
_TRAILER_TAG = b"\nblockllm-checkpoint "
# Far more than a trailer needs; a newer format may add fields, so it is read generously.
_TRAILER_MAX = 1024
_CHUNK = 1 << 20


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
    """The newest checkpoint in ``directory``, or None (not checked: see :func:`load_latest_checkpoint`)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


class _HashingWriter:
    """A write-only file object that feeds every byte to SHA-256 on its way to disk.

    ``torch.save`` writes through it, so the checksum costs no second pass over the file. torch
    turns an ``OSError`` raised in ``write`` into an unrelated ``RuntimeError`` ("unexpected pos
    ..."), so the first error is kept in :attr:`error` for the caller to raise instead.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data)
        try:
            self._handle.write(view)
        except OSError as exc:
            self.error = exc
            raise
        self._digest.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._handle.flush()

    def trailer(self) -> bytes:
        """The checksum line for everything written so far; the digest also signs its fields."""
        from blockllm import __version__

        fields = f"format={CHECKPOINT_FORMAT} blockllm={__version__} size={self.size}".encode()
        self._digest.update(fields)
        return _TRAILER_TAG + fields + b" sha256=" + self._digest.hexdigest().encode() + b"\n"


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

    Raises:
        OSError: the file could not be written (a full disk, a quota); every existing checkpoint
            is untouched and no temporary file is left behind.
    """
    from blockllm import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    temp = directory / f"{_TEMP_PREFIX}{final.name}.{os.getpid()}"
    record = {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "blockllm_version": __version__,
        "step": int(step),
        **payload,
    }
    try:
        with open(temp, "wb") as handle:
            writer = _HashingWriter(handle)
            try:
                torch.save(record, writer)
            except RuntimeError as exc:
                if writer.error is not None:
                    raise writer.error from exc
                raise
            handle.write(writer.trailer())
            handle.flush()
            # Without fsync a power cut after the rename can leave an empty file under the final
            # name: the rename reaches the disk before the data does on some filesystems. fsync is
            # also where a full disk shows up on filesystems that allocate lazily.
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_directory(directory)
    finally:
        # Removing a file needs no free space; a failure to remove must not hide the real error.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
    _prune(directory, keep)
    logger.info("Saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`, onto the CPU.

    Raises:
        CorruptCheckpointError: the file is truncated, changed since it was written (checksum
            mismatch), or cannot be parsed.
        CheckpointVersionError: the file is from a checkpoint format this blockllm cannot read.
        CheckpointError: the file is missing or is not a blockllm run checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        trailer = _read_trailer(path)
        if trailer is not None:
            _check_format(path, trailer.get("format"), trailer.get("blockllm"))
            _verify(path, trailer)
    except OSError as exc:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(record, dict) or record.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a blockllm run checkpoint")
    version = record.get("format")
    _check_format(path, version, record.get("blockllm_version"))
    if trailer is None and version != 1:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: its checksum line is missing (the file was cut short "
            "or edited)"
        )
    if trailer is not None and str(version) != trailer.get("format"):
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: its checksum line says format {trailer.get('format')}, "
            f"its contents format {version}"
        )
    if trailer is None:
        logger.info(
            "%s is a format-1 checkpoint (blockllm 0.1.0) without a checksum; loaded unverified",
            path,
        )
    return record


def load_latest_checkpoint(
    directory: str | Path,
) -> tuple[Path, dict[str, Any], list[tuple[Path, CorruptCheckpointError]]]:
    """The newest checkpoint in ``directory`` that is intact, falling back past damaged ones.

    Every damaged checkpoint skipped on the way is logged as a warning that names it, why it was
    rejected, and which checkpoint is used instead. Nothing is deleted or renamed here (see
    :func:`quarantine`).

    Returns:
        ``(path, record, skipped)``: the checkpoint used, its contents, and the newer checkpoints
        that were damaged, newest first, each with its error.

    Raises:
        CorruptCheckpointError: there are checkpoints but every one is damaged.
        CheckpointVersionError: the newest readable-looking checkpoint is from a newer format
            (falling back would silently throw away the newer release's progress).
        CheckpointError: ``directory`` holds no checkpoint, or a file that is not a blockllm
            checkpoint.
    """
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointError(f"{directory} holds no checkpoint")
    skipped: list[tuple[Path, CorruptCheckpointError]] = []
    for _, path in reversed(found):
        try:
            record = load_checkpoint(path)
        except CorruptCheckpointError as exc:
            skipped.append((path, exc))
            continue
        for _, error in skipped:
            logger.warning(
                "%s; resuming from the previous checkpoint %s (step %d) instead",
                error, path.name, int(record["step"]),
            )  # fmt: skip
        return path, record, skipped
    if len(skipped) == 1:
        raise skipped[0][1]
    reasons = "; ".join(str(error) for _, error in skipped)
    raise CorruptCheckpointError(
        f"every checkpoint in {directory} is corrupt or unreadable, nothing to resume from: {reasons}"
    )


def quarantine(path: str | Path) -> Path:
    """Rename a damaged checkpoint to ``step_....pt.corrupt`` (kept for inspection, never pruned).

    Left under its name, a damaged newer checkpoint would keep being found first, and pruning
    (which keeps the *newest* names) could delete the intact checkpoint the run resumed from.

    Returns:
        The new path.
    """
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{number}")
    os.replace(path, target)
    logger.warning(
        "Kept the damaged checkpoint as %s (delete it when you no longer need it)", target
    )
    return target


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


def _read_trailer(path: Path) -> dict[str, str] | None:
    """The trailer's ``key=value`` fields, or None when the file does not end in one."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - _TRAILER_MAX))
        tail = handle.read()
    if not tail.endswith(b"\n"):
        return None
    start = tail.rfind(_TRAILER_TAG)
    if start < 0:
        return None
    line = tail[start + len(_TRAILER_TAG) : -1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = dict(item.partition("=")[::2] for item in text.split())
    fields["_length"] = str(len(tail) - start)
    fields["_signed"] = text.partition(" sha256=")[0]
    return fields


def _check_format(path: Path, version: Any, written_by: Any) -> None:
    """Accept a readable format; a newer one is a version error, anything else damage."""
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if version in READABLE_FORMATS:
        return
    if not isinstance(version, int) or isinstance(version, bool) or version < max(READABLE_FORMATS):
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: it names checkpoint format {version!r}, which no "
            "blockllm writes"
        )
    from blockllm import __version__

    readable = " and ".join(str(v) for v in READABLE_FORMATS)
    origin = f" (written by blockllm {written_by})" if written_by else ""
    raise CheckpointVersionError(
        f"checkpoint {path} uses checkpoint format {version}{origin}; this blockllm "
        f"{__version__} reads formats {readable}: upgrade blockllm (pip install -U blockllm) "
        "to resume from it"
    )


def _verify(path: Path, trailer: dict[str, str]) -> None:
    """Check the archive's size, and the SHA-256 of the archive and the trailer's fields."""
    try:
        expected_size = int(trailer["size"])
        expected_sha = trailer["sha256"]
    except (KeyError, ValueError):
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: its checksum line is damaged"
        ) from None
    actual_size = path.stat().st_size - int(trailer["_length"])
    if actual_size != expected_size:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: {actual_size} bytes before the checksum line, "
            f"{expected_size} written (truncated or extended)"
        )
    digest = hashlib.sha256()
    left = expected_size
    with open(path, "rb") as handle:
        while left > 0:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    digest.update(trailer["_signed"].encode("ascii"))
    if digest.hexdigest() != expected_sha:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: checksum mismatch (the file changed after it was "
            "written)"
        )


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
    "CHECKPOINT_FORMAT",
    "READABLE_FORMATS",
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "quarantine",
    "restore_rng_state",
    "save_checkpoint",
]
