"""How candidate tensors are ranked at a selection: small objects, pluggable as ``score=``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

NormFn = Callable[[torch.Tensor], float]


@runtime_checkable
class Scorer(Protocol):
    """Scores one candidate from its gradient on a selection step; higher is selected first.

    Args of ``score``:
        grad: the candidate's gradient (under FSDP2 a DTensor; this rank's shard inside it).
        norm: the 2-norm of a whole gradient, reduced over shards where needed; use it rather
            than ``torch.linalg.vector_norm`` so that the score is the same on every rank.
        generator: the optimizer's seeded generator (checkpointed with it), for random scores.

    The optimizer divides the score by ``1 + visits`` afterwards when ``visit_penalty`` is on.
    """

    def score(self, grad: torch.Tensor, *, norm: NormFn, generator: torch.Generator) -> float: ...


class GradNormScorer:
    """``score="grad_norm"``: ``||G_l||_2``, the paper's criterion."""

    def score(self, grad: torch.Tensor, *, norm: NormFn, generator: torch.Generator) -> float:
        return norm(grad)


class CyclicScorer:
    """``score="cyclic"``: FRUGAL's and BAdam's order instead of a score of the gradient.

    The candidates selected the fewest times come first and, among them, the last registered
    (the layers nearest the output, FRUGAL's "descending" order). Each selection therefore takes
    the next blocks of a sweep from the output down to the input, and a new sweep starts when
    every candidate has had its turn. The order lives in the visit counts, which checkpoints
    already hold, so resuming continues the sweep. The visit penalty has nothing to add and is
    not applied.
    """

    def position(self, index: int, visits: Sequence[int]) -> float:
        """The candidate's place in the sweep as a score: higher is selected first."""
        return float(index - visits[index] * len(visits))

    def score(self, grad: torch.Tensor, *, norm: NormFn, generator: torch.Generator) -> float:
        raise TypeError("CyclicScorer ranks by position; the selector calls position()")


class RandomScorer:
    """``score="random"``: a uniform draw, the ablation baseline (how much does the gradient buy?)."""

    def score(self, grad: torch.Tensor, *, norm: NormFn, generator: torch.Generator) -> float:
        return float(torch.rand((), generator=generator))


SCORERS = {"grad_norm": GradNormScorer, "random": RandomScorer, "cyclic": CyclicScorer}


# Entries per slice when a bf16/fp16 gradient's norms are taken in fp32: ``vector_norm(x,
# dtype=torch.float32)`` widens the whole of ``x`` into a new tensor first (4 bytes an entry:
# on a bf16 run the largest temporary of the backward), so low-precision tensors are reduced a
# slice at a time; a slice's copy is 16 MB, and an accelerator pays a few launches per matrix.
_NORM_SLICE_ELEMENTS = 1 << 22


def grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """``||grad||_2`` with no squared copy of the gradient: fp32 and fp64 in one reduction in
    their own dtype (``vector_norm`` will not narrow fp64), low precision in fp32, a slice at a
    time (no fp32 copy of the whole tensor)."""
    if grad.dtype not in (torch.bfloat16, torch.float16):
        return torch.linalg.vector_norm(grad)
    flat = grad.reshape(-1)
    if flat.numel() <= _NORM_SLICE_ELEMENTS:
        return torch.linalg.vector_norm(flat, dtype=torch.float32)
    pieces = [
        torch.linalg.vector_norm(piece, dtype=torch.float32)
        for piece in flat.split(_NORM_SLICE_ELEMENTS)
    ]
    return torch.linalg.vector_norm(torch.stack(pieces))


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """``||grad||^2`` for clipping: fp32 at least, fp64 for an fp64 gradient (torch's clip sums
    each tensor's norm in its own dtype)."""
    return grad_norm(grad).to(torch.promote_types(grad.dtype, torch.float32)).square()


def row_norms(by_row: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of a matrix: in its own dtype when fp32/fp64, else in fp32
    a block of rows at a time (as :func:`grad_norm`, no fp32 copy of the whole matrix)."""
    if by_row.dtype not in (torch.bfloat16, torch.float16):
        return torch.linalg.vector_norm(by_row, dim=1)
    rows_per_slice = max(1, _NORM_SLICE_ELEMENTS // max(1, by_row.shape[1]))
    return torch.cat([
        torch.linalg.vector_norm(block, dim=1, dtype=torch.float32)
        for block in by_row.split(rows_per_slice)
    ])  # fmt: skip


def make_scorer(spec: str | Scorer) -> Scorer:
    """The built-in scorer ``spec`` names, or ``spec`` itself when an object.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(spec, str):
        return spec
    if spec not in SCORERS:
        raise ValueError(f"Invalid score: {spec!r} (choose from {', '.join(map(repr, SCORERS))})")
    return SCORERS[spec]()


__all__ = [
    "SCORERS",
    "CyclicScorer",
    "GradNormScorer",
    "RandomScorer",
    "Scorer",
    "grad_norm",
    "make_scorer",
    "row_norms",
    "squared_norm",
]
