"""Bytes allocated on the CPU, read from ``torch.profiler``'s allocation events.

The measured memory figures of the benchmarks and of the planner's tests come from here: the
allocator's own events (``profile_memory=True``), not sampled RSS, so that a transient of one
step is seen however briefly it lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def allocation_events(profiler: Any) -> list[tuple[int, int]]:
    """``(start_ns, bytes)`` of every allocation (positive) and free (negative), in time order."""
    return sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )


def peak_allocated(fn: Callable[[], Any]) -> int:
    """The most bytes ``fn`` holds allocated at once beyond what existed before it."""
    from torch.profiler import ProfilerActivity, profile  # loads torch: not at import

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    live = peak = 0
    for _, nbytes in allocation_events(profiler):
        live += nbytes
        peak = max(peak, live)
    return peak


__all__ = ["allocation_events", "peak_allocated"]
