"""Gradient clipping over exactly what a BlockLLM step will apply."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch

from blockllm.distributed.base import Communicator
from blockllm.optim.compact_grads import CompactGradients
from blockllm.selection.candidates import CandidateSet
from blockllm.selection.coordinates import gather
from blockllm.selection.packing import Coordinates


@torch.no_grad()
def clip_selected_(
    max_norm: float,
    norm_type: float,
    parameters: Iterable[torch.Tensor],
    candidates: CandidateSet,
    selection: Coordinates | None,
    compact: CompactGradients,
    comm: Communicator,
    consumed_squares: list[torch.Tensor] = (),
    elsewhere: list[tuple[torch.Tensor, torch.Tensor]] = (),
    left_for_rest: Collection[int] = frozenset(),
    pending: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale the held gradients to a total norm of at most ``max_norm``.

    The norm is taken over whole tensors' gradients and the *selected coordinates* of partly
    selected ones (``selection``), compacted or not; ``selection=None`` (a selection step, the
    coordinates not chosen yet) counts every held gradient whole. ``parameters`` decides which
    ``.grad`` tensors take part and in what order they are summed: the model's order gives
    ``torch.nn.utils.clip_grad_norm_``'s norm to the last bit. Under data parallelism every
    gradient is averaged first (once), so that the whole batch's gradient is clipped.
    ``consumed_squares``: squared norms of gradients a state-free rest step has already used and
    freed; they count in the 2-norm. ``elsewhere``: gradients held outside ``.grad`` with their
    whole tensor's squared norm (a selection step's shortlists): the norm counts, the values
    (and the squares, for a second clip) are scaled.

    ``left_for_rest``: candidates whose ``.grad`` a rest rule will still step with: they count
    in the norm but are not scaled (the rest steps with unclipped gradients wherever it runs);
    the caller scales Adam's part of them later by the returned coefficient. ``pending``: the
    coefficient of an earlier clip of this step still owed to them (and to the consumed
    squares), so that a second clip measures what the first left.

    Under FSDP2 each rank measures its shards and the squares are summed over the ranks, so
    every rank clips by the same coefficient, the whole gradient's. ``max_norm=inf`` only
    measures: nothing is scaled.

    Returns:
        The total norm before this clip, and the coefficient applied (None when only measured).

    Raises:
        ValueError: a norm other than the 2-norm while rest gradients were consumed, or under
            FSDP2.
    """
    grads: list[torch.Tensor] = []
    measured: list[torch.Tensor] = []
    pairs: list[tuple[int, torch.Tensor]] = []
    owed: list[int] = []  # positions in `measured` of gradients the pending coefficient is owed
    # The precision the squares are summed in: fp32, fp64 when a weight is fp64. Read from the
    # weights, not the gradients held, so that under FSDP2 every rank all-reduces one dtype.
    summed = torch.float32
    for param in parameters:
        summed = torch.promote_types(summed, param.dtype)
        grad = comm.local(param.grad)
        if grad is None:
            continue
        index = candidates.index(param)
        if index is not None:
            pairs.append((index, grad))
        if index is None or index not in left_for_rest:
            grads.append(grad)
        elif pending is not None:
            owed.append(len(measured))
        coordinates = None if selection is None else selection.get(index)
        measured.append(grad if coordinates is None else (grad, coordinates))
    pairs += compact.held.items()
    comm.average_grads_(pairs)
    # Gathered only now, after averaging.
    measured = [m if isinstance(m, torch.Tensor) else gather(*m) for m in measured]
    for position in owed:  # a copy: the gradient itself stays unclipped for the rest
        measured[position] = measured[position] * pending.to(measured[position].dtype)
    grads += compact.held.values()
    measured += compact.held.values()
    grads += [values for values, _ in elsewhere]
    if pending is not None:
        consumed_squares = [squares * pending.square() for squares in consumed_squares]
    consumed_squares = [*consumed_squares, *(squares for _, squares in elsewhere)]
    if consumed_squares and float(norm_type) != 2.0:
        raise ValueError(
            f"Invalid norm_type: {norm_type}; only the 2-norm can be clipped when gradients were "
            "already used in backward (a rest rule) or reduced to their candidates (a selection "
            "step's shortlists); clip other norms with compact_grads=False and rest='none'"
        )
    if comm.shards_parameters and float(norm_type) != 2.0:
        raise ValueError(
            f"Invalid norm_type: {norm_type}; under FSDP2 only the 2-norm can be clipped (each "
            "rank measures its shards; their squares are summed over the ranks)"
        )
    if not measured and not consumed_squares and not comm.shards_parameters:
        return torch.zeros(()), None
    total = torch.nn.utils.get_total_norm(measured, norm_type) if measured else None
    if consumed_squares or comm.shards_parameters:
        # FSDP2: every rank takes part (a rank may hold nothing), and the shards' squares are
        # summed over the ranks, so that every rank clips against the whole gradient's norm.
        device = _device_of(consumed_squares, total, grads, comm)
        squares = torch.zeros((), dtype=summed, device=device)
        if consumed_squares:
            squares = torch.stack([s.to(device, summed) for s in consumed_squares]).sum()
        if total is not None:
            squares = squares + total.to(device, summed).square()
        comm.sum_over_shards_(squares)
        total = squares.sqrt()
    if math.isinf(max_norm):  # a measurement: nothing to scale (nor to poison with inf / inf)
        return total, None
    coefficient = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    for _, squares in elsewhere:  # a second clip must measure what this one left
        squares.mul_(coefficient.to(squares.device).square())
    return total, coefficient


def _device_of(
    squares: list[torch.Tensor],
    total: torch.Tensor | None,
    grads: list[torch.Tensor],
    comm: Communicator,
) -> torch.device:
    """Where the total is summed: the first measured thing's device; under FSDP2 a rank holding
    nothing still joins the all-reduce, on the shards' device."""
    for tensor in (*squares[:1], total, *grads[:1]):
        if tensor is not None:
            return tensor.device
    return getattr(comm, "device", torch.device("cpu"))


__all__ = ["clip_selected_"]
