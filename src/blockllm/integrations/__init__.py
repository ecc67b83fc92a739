"""Integrations of BlockLLM with training frameworks (Hugging Face Trainer, accelerate).

FSDP2 checkpoints (``torch.distributed.checkpoint``) live in
:mod:`blockllm.distributed.fsdp2_checkpoint`, imported by module path.

Nothing here is imported until it is used, so ``import blockllm`` never needs ``transformers``.
Asking for a name from :mod:`blockllm.integrations.hf` without ``transformers`` installed raises an
``ImportError`` that gives the install line (``pip install 'blockllm[hf]'``).

Example:
    >>> from blockllm.integrations import BlockLLMCallback, create_blockllm_optimizer
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule that defines it. The submodule is imported on first access (PEP 562),
# which keeps transformers an optional extra.
_LAZY_NAMES = {
    "BlockLLMCallback": "hf",
    "create_blockllm_optimizer": "hf",
    "prepare_model_for_blockllm": "hf",
    "unwrap_blockllm": "accelerate",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
