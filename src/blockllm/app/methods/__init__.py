"""Every ``--optimizer`` name: the registry, and the methods registered in it.

* :mod:`~blockllm.app.methods.registry`: :class:`OptimizerSpec`, :func:`register_optimizer`,
  :func:`get_optimizer_spec` and :data:`OPTIMIZERS`.
* :mod:`~blockllm.app.methods.adamw`: the AdamW baseline.
* :mod:`~blockllm.app.methods.blockllm_variants`: BlockLLM and its ablations.
* :mod:`~blockllm.app.methods.peers`: LISA, BAdam, GaLore, LoRA and 8-bit AdamW, whose adapters
  (``lisa.py``, ``badam.py`` ...) are imported only when their method is built.

Importing this package (or any module in it) registers all of them, in the order error messages
and ``--help`` list them.
"""

# The order of these imports is the order of OPTIMIZERS.
from blockllm.app.methods import adamw, blockllm_variants, peers  # noqa: F401  (registration)
from blockllm.app.methods.registry import (
    OPTIMIZERS,
    OptimizerSpec,
    get_optimizer_spec,
    register_optimizer,
)

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "get_optimizer_spec",
    "register_optimizer",
]
