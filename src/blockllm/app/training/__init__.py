"""The training loop behind the ``blockllm`` command line: pretraining and finetuning runs.

``TrainingRun(RunConfig.create("pretrain", "tiny", max_steps=100), "runs/tiny").run()`` trains,
logs ``metrics.jsonl`` and TensorBoard events, checkpoints atomically, and resumes bit for bit.
The optimizer is one of :mod:`blockllm.app.methods`, by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Loaded at first use (PEP 562): the command line imports the run config (this package) to build
# its flags, and ``blockllm pretrain --help`` should not wait for the loop's torch import.
_EXPORTS = {
    "CheckpointError": "blockllm.app.training.run_errors",
    "ConfigError": "blockllm.app.training.run_errors",
    "RunConfig": "blockllm.app.training.run_config",
    "RunDirError": "blockllm.app.training.run_errors",
    "TrainingInterrupted": "blockllm.app.training.run_errors",
    "TrainingRun": "blockllm.app.training.loop",
    "defaults_for": "blockllm.app.training.run_config",
    "read_metrics": "blockllm.app.training.metrics",
}

if TYPE_CHECKING:
    from blockllm.app.training.loop import TrainingRun
    from blockllm.app.training.metrics import read_metrics
    from blockllm.app.training.run_config import RunConfig, defaults_for
    from blockllm.app.training.run_errors import (
        CheckpointError,
        ConfigError,
        RunDirError,
        TrainingInterrupted,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blockllm.app.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "CheckpointError",
    "ConfigError",
    "RunConfig",
    "RunDirError",
    "TrainingInterrupted",
    "TrainingRun",
    "defaults_for",
    "read_metrics",
]
