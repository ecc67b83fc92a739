"""The methods BlockLLM is compared with, registered by name: LISA, BAdam, GaLore, LoRA, 8-bit AdamW.

Each adapter is one module of this package (``lisa``, ``badam``, ``galore``, ``lora``,
``adamw8bit``) that is imported only when its method is built, so a missing peer package costs
nothing until that method is asked for (:mod:`blockllm.app.methods.peer_packages` names the
package each one needs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from blockllm.app.methods.registry import OptimizerSpec, register_optimizer


def _peer(module: str, attribute: str) -> Callable[..., Any]:
    """``blockllm.app.methods.<module>.<attribute>``, imported at the first call.

    Registering by name keeps the peers' packages (and the adapters) out of every import of this
    registry: only the method that is built imports its package.
    """

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f"blockllm.app.methods.{module}"), attribute)(*args)

    call.__name__ = f"{module}.{attribute}"
    return call


register_optimizer(
    OptimizerSpec(
        name="lisa",
        build=_peer("lisa", "build"),
        description="LISA: AdamW on the embedding, head and a few random layers, changed every "
        "--patience steps",
        stats=_peer("lisa", "stats"),
    )
)
register_optimizer(
    OptimizerSpec(
        name="badam",
        build=_peer("badam", "build"),
        description="BAdam (pip install badam): one block at a time, switched every --patience steps",
        stats=_peer("badam", "stats"),
    )
)
register_optimizer(
    OptimizerSpec(
        name="galore",
        build=_peer("galore", "build"),
        description="GaLore (pip install galore-torch): Adam on low-rank projected gradients",
    )
)
register_optimizer(
    OptimizerSpec(
        name="lora",
        build=_peer("lora", "build"),
        prepare_model=_peer("lora", "prepare_model"),
        description="LoRA (pip install peft): rank-16 adapters on every linear layer, AdamW",
        stats=_peer("lora", "stats"),
    )
)
register_optimizer(
    OptimizerSpec(
        name="adamw-8bit",
        build=_peer("adamw8bit", "build"),
        description="8-bit AdamW (pip install bitsandbytes): block-wise quantized moments",
    )
)


# Nothing to import from here: importing the module registers the methods.
__all__: list[str] = []
