"""Memory planning: what a training step needs on the device, before anything is allocated.

* :mod:`~blockllm.app.planning.model_shapes`: a preset's or a ``config.json``'s tensors, read on
  the ``meta`` device;
* :mod:`~blockllm.app.planning.activation_memory`: the activations of a Llama-style decoder,
  counted tensor by tensor, with and without activation checkpointing;
* :mod:`~blockllm.app.planning.method_memory`: weights, gradients, optimizer state and master
  weights of each method, by its rules;
* :mod:`~blockllm.app.planning.memory_plan`: the methods side by side (``blockllm estimate``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: the CLI's parsers read PRECISIONS, and --help must not load torch.
# (The function activation_memory is not exported here: the submodule of that name would
# shadow it once imported; import it from blockllm.app.planning.activation_memory.)
_EXPORTS = {
    "PRECISIONS": "activation_memory",
    "ActivationMemory": "activation_memory",
    "MemoryPlan": "memory_plan",
    "default_methods": "memory_plan",
    "estimate_memory": "memory_plan",
    "format_plan": "memory_plan",
    "EstimateSettings": "method_memory",
    "MethodMemory": "method_memory",
    "ModelShape": "model_shapes",
    "load_model_shape": "model_shapes",
}

if TYPE_CHECKING:
    from blockllm.app.planning.activation_memory import (
        PRECISIONS,
        ActivationMemory,
    )
    from blockllm.app.planning.memory_plan import (
        MemoryPlan,
        default_methods,
        estimate_memory,
        format_plan,
    )
    from blockllm.app.planning.method_memory import EstimateSettings, MethodMemory
    from blockllm.app.planning.model_shapes import ModelShape, load_model_shape


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "PRECISIONS",
    "ActivationMemory",
    "EstimateSettings",
    "MemoryPlan",
    "MethodMemory",
    "ModelShape",
    "default_methods",
    "estimate_memory",
    "format_plan",
    "load_model_shape",
]
