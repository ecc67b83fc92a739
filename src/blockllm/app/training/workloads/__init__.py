"""What the training loop trains, one :class:`Workload` per kind of run.

* :mod:`~blockllm.app.training.workloads.workload`: the protocol and the helpers every workload
  shares (batches by index, the cache directory).
* :mod:`~blockllm.app.training.workloads.lm`: pretraining a language model.
* :mod:`~blockllm.app.training.workloads.finetune`: finetuning a classifier, or a causal LM that
  answers with the label word.
"""

from __future__ import annotations

from pathlib import Path

from blockllm.app.training.run_config import RunConfig
from blockllm.app.training.workloads.finetune import build_finetune_workload
from blockllm.app.training.workloads.lm import LanguageModelingWorkload
from blockllm.app.training.workloads.workload import Workload


def build_workload(config: RunConfig, cache_dir: Path) -> Workload:
    """The workload ``config`` describes.

    Raises:
        FileNotFoundError, ValueError, ImportError: from loading data, tokenizer or model.
    """
    if config.command == "pretrain":
        return LanguageModelingWorkload(config, cache_dir)
    return build_finetune_workload(config, cache_dir)


__all__ = ["Workload", "build_workload"]
