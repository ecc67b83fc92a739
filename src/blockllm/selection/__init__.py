"""Selection policy pieces: budget packing, streaming scoring, reselection triggers."""

from blockllm.selection.packing import PaperMaskPacker, Plan, WholeTensorPacker
from blockllm.selection.scoring import ScoringPass
from blockllm.selection.triggers import IntervalTrigger, LossPlateauTrigger

__all__ = [
    "IntervalTrigger",
    "LossPlateauTrigger",
    "PaperMaskPacker",
    "Plan",
    "ScoringPass",
    "WholeTensorPacker",
]
