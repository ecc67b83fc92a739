"""The ``blockllm`` command line: ``demo``, ``pretrain``, ``finetune`` and ``report``."""

from blockllm.cli.main import main

__all__ = ["main"]
