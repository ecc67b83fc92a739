"""The ``blockllm`` command line: ``demo``, ``pretrain``, ``finetune`` and ``report``."""

from blockllm.app.cli.main import main

__all__ = ["main"]
