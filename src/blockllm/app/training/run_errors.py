"""Errors of the training loop that mean "the user's input is wrong", not "the code is wrong".

The CLI turns each of them into one line on stderr and exit code 2. They also derive from the
builtin they specialise, so ``except ValueError`` keeps working for callers of the library.
"""

from __future__ import annotations

import signal

from blockllm.errors import BlockLLMError


class ConfigError(BlockLLMError, ValueError):
    """A run configuration holds an unknown name or an out-of-range value."""


class RunDirError(BlockLLMError, RuntimeError):
    """The output directory cannot take this run without losing or mixing files."""


class CheckpointError(BlockLLMError, RuntimeError):
    """A checkpoint is missing, unreadable, or was saved by a different run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is damaged: cut short, changed after it was written, or unparsable.

    Resuming falls back to the next older checkpoint when one is intact.
    """


class CheckpointVersionError(CheckpointError):
    """A checkpoint was written in a format this blockllm cannot read (by a newer release).

    Not a reason to fall back to an older checkpoint: the fix is to upgrade blockllm.
    """


#: The signals that stop a run cleanly (finish the step, checkpoint, exit with 128 + N): Ctrl-C,
#: ``kill``, and SIGHUP, which a closed terminal or a dropped SSH session sends; without a handler
#: it would kill the run and lose everything since the last periodic checkpoint. (Windows has no
#: SIGHUP.)
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class TrainingInterrupted(BlockLLMError, RuntimeError):
    """SIGINT/SIGTERM/SIGHUP stopped training after a checkpoint was saved.

    Attributes:
        signal_number: The signal that stopped the run.
        step: The last completed step (the checkpoint's step).
        checkpoint: Path of the checkpoint written on the way out.
    """

    def __init__(self, signal_number: int, step: int, checkpoint: str) -> None:
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"interrupted by {signal.Signals(signal_number).name} after step {step}; checkpoint saved to "
            f"{checkpoint}; continue with --resume"
        )


class DistributedTrainingError(BlockLLMError, RuntimeError):
    """Under torchrun, this rank lost the others: a rank died or hung past the timeout.

    Not a bug and not bad input: the last checkpoint is intact and ``--resume`` continues.
    """


__all__ = [
    "CheckpointError",
    "CheckpointVersionError",
    "ConfigError",
    "CorruptCheckpointError",
    "DistributedTrainingError",
    "RunDirError",
    "STOP_SIGNALS",
    "TrainingInterrupted",
]
