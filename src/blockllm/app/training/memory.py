"""Memory measurements: process peak RSS, CUDA peak allocation, and bytes held by tensor category.

Peak RSS is what the operating system charged the process (``getrusage``), so compare methods
only across separate processes (the demo and the benchmarks run each method in its own). The
tensor counts are exact and process-independent: bytes of parameters, gradients, optimizer state
and master weights, read off the tensors that exist at the moment of measuring.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from torch import nn

from blockllm.optim.protocols import ReportsMemory

CATEGORIES = ("params", "grads", "optimizer_state", "master_weights")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux ``/proc``), or None where unavailable.

    The bench takes it just before the first training step, so that the training's own share of
    the peak (``peak - baseline``) can be told apart from the interpreter, libraries, model and data.
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


def cuda_peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` on a CUDA device, else None."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of each category in :data:`CATEGORIES`, counted from the live tensors.

    Uses the optimizer's own ``memory_report()`` when it has one (BlockLLM counts its coordinate
    lists and master copies); otherwise parameters and gradients come from the model (tied
    weights counted once) and the optimizer state from ``optimizer.state``.
    """
    if isinstance(optimizer, ReportsMemory):
        counted = optimizer.memory_report()
        return {category: int(counted.get(category, 0)) for category in CATEGORIES}
    counted = dict.fromkeys(CATEGORIES, 0)
    for param in model.parameters():  # parameters() yields a tied tensor once
        counted["params"] += _nbytes(param)
        if param.grad is not None:
            counted["grads"] += _nbytes(param.grad)
    seen: set[int] = set()
    for state in optimizer.state.values():
        counted["optimizer_state"] += _state_bytes(state, seen)
    return counted


def _state_bytes(value: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensors in one optimizer-state entry, however they are held.

    Peers keep state tensors inside containers and objects (GaLore's projector holds its matrix
    as an attribute), so the count walks dicts, lists and objects' attributes a few levels deep;
    ``seen`` makes a tensor shared by several entries count once.
    """
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return _nbytes(value)
    if depth >= 3:
        return 0
    if isinstance(value, dict):
        return sum(_state_bytes(item, seen, depth + 1) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(item, seen, depth + 1) for item in value)
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(value, type):
        return sum(_state_bytes(item, seen, depth + 1) for item in attributes.values())
    return 0


class MemoryTracker:
    """The running maximum of each tensor category, and of RSS / CUDA memory.

    Gradients peak just before the optimizer step and the optimizer state just after it, so the
    loop calls :meth:`sample` at both points.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def sample(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for category, value in tensor_bytes(model, optimizer).items():
            self.peak[category] = max(self.peak[category], value)

    def summary(self) -> dict[str, Any]:
        """Peaks so far, including process-level ones, as a flat JSON-ready dict."""
        result: dict[str, Any] = {f"peak_{name}_bytes": value for name, value in self.peak.items()}
        result["peak_rss_bytes"] = peak_rss_bytes()
        cuda = cuda_peak_bytes(self.device)
        if cuda is not None:
            result["peak_cuda_bytes"] = cuda
        return result

    def state_dict(self) -> dict[str, int]:
        return dict(self.peak)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for category in CATEGORIES:
            self.peak[category] = max(self.peak[category], int(state.get(category, 0)))


def format_bytes(value: float | None) -> str:
    """``1536000`` -> ``"1.5 MB"`` (decimal units, as ``ls -lh --si`` and most papers)."""
    if value is None:
        return "n/a"
    if abs(value) < 1000:
        return f"{value:.0f} B"
    for unit in ("kB", "MB"):
        value /= 1000
        if abs(value) < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.2f} GB"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


__all__ = [
    "CATEGORIES",
    "MemoryTracker",
    "cuda_peak_bytes",
    "current_rss_bytes",
    "format_bytes",
    "peak_rss_bytes",
    "tensor_bytes",
]
