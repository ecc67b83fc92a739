"""The training loop behind the ``blockllm`` command line: pretraining and finetuning runs.

``TrainingRun(RunConfig.create("pretrain", "tiny", max_steps=100), "runs/tiny").run()`` trains,
logs ``metrics.jsonl`` and TensorBoard events, checkpoints atomically, and resumes bit for bit.
The optimizer is one of :mod:`blockllm.app.methods`, by name.
"""

from blockllm.app.training.loop import TrainingRun
from blockllm.app.training.metrics import read_metrics
from blockllm.app.training.run_config import RunConfig, defaults_for
from blockllm.app.training.run_errors import (
    CheckpointError,
    ConfigError,
    RunDirError,
    TrainingInterrupted,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "RunConfig",
    "RunDirError",
    "TrainingRun",
    "TrainingInterrupted",
    "defaults_for",
    "read_metrics",
]
