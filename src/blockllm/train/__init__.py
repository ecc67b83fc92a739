"""The training loop behind the ``blockllm`` command line: pretraining and finetuning runs.

``Trainer(RunConfig.create("pretrain", "tiny", max_steps=100), "runs/tiny").run()`` trains, logs
``metrics.jsonl`` and TensorBoard events, checkpoints atomically, and resumes bit for bit. New
optimizers join through :func:`register_optimizer` (one :class:`OptimizerSpec` each).
"""

from blockllm.train.config import RunConfig, defaults_for
from blockllm.train.errors import CheckpointError, ConfigError, RunDirError, TrainingInterrupted
from blockllm.train.loop import Trainer
from blockllm.train.metrics import read_metrics
from blockllm.train.optimizers import (
    OPTIMIZERS,
    OptimizerSpec,
    get_optimizer_spec,
    register_optimizer,
)

__all__ = [
    "OPTIMIZERS",
    "CheckpointError",
    "ConfigError",
    "OptimizerSpec",
    "RunConfig",
    "RunDirError",
    "Trainer",
    "TrainingInterrupted",
    "defaults_for",
    "get_optimizer_spec",
    "read_metrics",
    "register_optimizer",
]
