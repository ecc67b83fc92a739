"""blockllm: train and finetune language models in far less memory with BlockLLM.

Only a small, gradient-selected set of parameter tensors is trainable at a time, so gradients and
Adam state exist only for it; the set is reselected when the loss stops improving.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.6.7"

# The public names, each loaded from its module at first use (PEP 562). Every module of the
# package, the ``blockllm`` command's included, imports this file first; importing the optimizer
# here would load torch (about 2 s on a small CPU) before ``blockllm --help`` could answer.
_EXPORTS = {
    "BlockLLM": "blockllm.optim",
    "BlockLLMConfig": "blockllm.config",
    "BlockLLMError": "blockllm.errors",
    "NoMatchingParamsError": "blockllm.errors",
    "RowGradients": "blockllm.optim.row_gradients",
    "StateDictMismatchError": "blockllm.errors",
    "param_groups": "blockllm.parameter_groups",
}

if TYPE_CHECKING:
    from blockllm.config import BlockLLMConfig
    from blockllm.errors import BlockLLMError, NoMatchingParamsError, StateDictMismatchError
    from blockllm.optim import BlockLLM
    from blockllm.optim.row_gradients import RowGradients
    from blockllm.parameter_groups import param_groups


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blockllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BlockLLM",
    "BlockLLMConfig",
    "BlockLLMError",
    "NoMatchingParamsError",
    "RowGradients",
    "StateDictMismatchError",
    "param_groups",
    "__version__",
]
