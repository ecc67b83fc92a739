"""``BlockLLM.memory_report()``: the bytes an optimizer holds, counted from its tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from blockllm.selection.coordinates import index_bytes

LocalFn = Callable[[torch.Tensor | None], torch.Tensor | None]


def count_bytes(
    param_groups: list[dict[str, Any]],
    state: dict[torch.Tensor, dict[str, Any]],
    coordinate_lists: Iterable[torch.Tensor | None],
    compact_bytes: int,
    local: LocalFn,
    rest_state_bytes: int = 0,
) -> dict[str, int]:
    """Bytes held now, by category.

    ``params``: every parameter in the param groups; ``grads``: their ``.grad`` tensors plus the
    compacted gradients; ``optimizer_state``: Adam moments, step counters and coordinate lists;
    ``master_weights``: fp32 copies of low-precision blocks. A stateful rest rule's state
    (``rest_state_bytes``) counts as optimizer state. Under FSDP2 ``local`` gives this
    rank's shards, the memory it holds (``DTensor.numel()`` is global).
    """
    report = {"params": 0, "grads": 0, "optimizer_state": 0, "master_weights": 0}
    for group in param_groups:
        for param in group["params"]:
            param, grad = local(param), local(param.grad)
            report["params"] += _nbytes(param)
            if grad is not None:
                report["grads"] += _nbytes(grad)
    for values in state.values():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                category = "master_weights" if key == "master" else "optimizer_state"
                report[category] += _nbytes(value)
    for coordinates in coordinate_lists:
        if coordinates is not None:
            report["optimizer_state"] += index_bytes(coordinates)
    report["grads"] += compact_bytes
    report["optimizer_state"] += rest_state_bytes
    return report


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


__all__ = ["count_bytes"]
