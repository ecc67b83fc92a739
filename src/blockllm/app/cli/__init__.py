"""The ``blockllm`` command line: ``demo``, ``pretrain``, ``finetune``, ``bench`` and ``report``.

Only argument parsing, logging set-up and terminal output live here; each command calls into
:mod:`blockllm.app.training`, :mod:`blockllm.app.bench` and the other packages of the app.
"""

from blockllm.app.cli.main import main

__all__ = ["main"]
