"""blockllm: train and finetune language models in far less memory with BlockLLM.

Only a small, gradient-selected set of parameter tensors is trainable at a time, so gradients and
Adam state exist only for it; the set is reselected when the loss stops improving.
"""

from blockllm.config import BlockLLMConfig
from blockllm.errors import BlockLLMError, NoMatchingParamsError, StateDictMismatchError
from blockllm.optim import BlockLLM
from blockllm.optim.row_gradients import RowGradients

__version__ = "0.4.0"

__all__ = [
    "BlockLLM",
    "BlockLLMConfig",
    "BlockLLMError",
    "NoMatchingParamsError",
    "RowGradients",
    "StateDictMismatchError",
    "__version__",
]
