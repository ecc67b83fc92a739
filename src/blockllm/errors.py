"""Exceptions raised by blockllm.

Each one also derives from the builtin it specialises, so ``except ValueError`` in user code keeps
working (the PEFT convention).
"""

from __future__ import annotations


class BlockLLMError(Exception):
    """Base class of every error that blockllm raises on purpose."""


class NoMatchingParamsError(BlockLLMError, ValueError):
    """An ``include``/``exclude``/``always_adam`` pattern matched no parameter name.

    ``always_adam="auto"`` never raises it: it pins whatever it recognises, possibly nothing.
    """


class StateDictMismatchError(BlockLLMError, ValueError):
    """A state_dict was saved for a different model or by an incompatible version."""
