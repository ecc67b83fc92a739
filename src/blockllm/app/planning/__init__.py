"""Memory planning: what a training step needs on the device, before anything is allocated.

* :mod:`~blockllm.app.planning.model_shapes`: a preset's or a ``config.json``'s tensors, read on
  the ``meta`` device;
* :mod:`~blockllm.app.planning.activation_memory`: the activations of a Llama-style decoder,
  counted tensor by tensor, with and without activation checkpointing;
* :mod:`~blockllm.app.planning.method_memory`: weights, gradients, optimizer state and master
  weights of each method, by its rules;
* :mod:`~blockllm.app.planning.memory_plan`: the methods side by side (``blockllm estimate``).
"""

from blockllm.app.planning.activation_memory import PRECISIONS, ActivationMemory, activation_memory
from blockllm.app.planning.memory_plan import (
    MemoryPlan,
    default_methods,
    estimate_memory,
    format_plan,
)
from blockllm.app.planning.method_memory import EstimateSettings, MethodMemory
from blockllm.app.planning.model_shapes import ModelShape, load_model_shape

__all__ = [
    "PRECISIONS",
    "ActivationMemory",
    "EstimateSettings",
    "MemoryPlan",
    "MethodMemory",
    "ModelShape",
    "activation_memory",
    "default_methods",
    "estimate_memory",
    "format_plan",
    "load_model_shape",
]
