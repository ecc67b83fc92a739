"""The training loop behind the ``blockllm`` command line: pretraining and finetuning runs.

``Trainer(RunConfig.create("pretrain", "tiny", max_steps=100), "runs/tiny").run()`` trains, logs
``metrics.jsonl`` and TensorBoard events, checkpoints atomically, and resumes bit for bit. New
optimizers join through :func:`register_optimizer` (one :class:`OptimizerSpec` each).
"""

from blockllm.app.methods.registry import (
    OPTIMIZERS,
    OptimizerSpec,
    get_optimizer_spec,
    register_optimizer,
)
from blockllm.app.training.config import RunConfig, defaults_for
from blockllm.app.training.loop import Trainer
from blockllm.app.training.metrics import read_metrics
from blockllm.app.training.run_errors import (
    CheckpointError,
    ConfigError,
    RunDirError,
    TrainingInterrupted,
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
