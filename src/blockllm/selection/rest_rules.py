"""State-free update rules for the candidate coordinates Adam does not update ("the rest").

BlockLLM keeps Adam moments for the gradient-selected block only. With ``rest="none"`` (the
paper's method) every other candidate is frozen until it is selected. With a state-free rule
every other candidate coordinate moves every step too, by ``lr * rest_lr_scale * direction(g)``
(plus decoupled weight decay), where ``direction`` needs nothing but the current gradient:

* ``"factored"`` (the default since 0.6, through ``rest="auto"``): Adafactor without momentum,
  ``g / sqrt(v)`` with ``v`` a rank-1 EMA of ``g**2`` kept as one vector per row and one per
  column (O(rows + columns) state), RMS clipped to 1; with a short memory (``factored_beta2``
  0.99) it beat sign by 1.7-2.3 % of the eval loss in pretraining (benchmarks/README.md);
* ``"sign"``: ``sign(g)`` (signSGD; FRUGAL's rule for the non-Adam part; 0.5's default);
* ``"colnorm"``: each output row of a matrix divided by its root mean square (SCALE's
  column-normalised SGD; for ``nn.Linear`` weights, shaped ``(out, in)``, a row is one output
  unit's incoming weights). A vector (a bias, a norm's gain) is read as ``(out, 1)``, one weight
  per output, so its direction is its sign; this keeps every row whole on one FSDP2 shard.

Sign and colnorm are invariant to the gradient's scale. The optimizer gives every rule the
unclipped gradient, wherever the rest steps (hooks or ``step()``); clipping by a global norm
changes Adam's part only (the factored rule's statistics would see the clip: see
:class:`FactoredRest`). A rule is a small object and users can plug in their own
(``rest=MyRule()``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from blockllm.selection.coordinates import RowCoordinates

# Root mean squares below this are treated as zero gradient rows: no movement, no blow-up.
_RMS_FLOOR = 1e-8
# Elements per slice when summing squares down the columns on a CPU (see below): large enough
# that the per-slice overhead vanishes, small enough that the slice's square stays in cache.
_COLUMN_SLICE_ELEMENTS = 1 << 18
# Elements per slice on an accelerator, where only a bf16/fp16 matrix is sliced (to widen it
# to fp32 a slice at a time): 16 MB of fp32, a few kernel launches per matrix.
_ACCELERATOR_SLICE_ELEMENTS = 1 << 22


def _on_accelerator(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` takes the accelerator's form of each pass (whole-tensor kernels)."""
    return tensor.device.type != "cpu"


def _low_precision(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.bfloat16, torch.float16)


def _row_slices(matrix: torch.Tensor, columns: int | None = None) -> tuple[torch.Tensor, ...]:
    """Slices of whole rows, about ``_COLUMN_SLICE_ELEMENTS`` each (an accelerator's:
    ``_ACCELERATOR_SLICE_ELEMENTS``) for ``columns`` columns (``matrix``'s own by default), so
    that slices of several tensors line up."""
    width = matrix.shape[1] if columns is None else columns
    elements = _ACCELERATOR_SLICE_ELEMENTS if _on_accelerator(matrix) else _COLUMN_SLICE_ELEMENTS
    return matrix.split(max(16, elements // max(1, width)))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rule computes in: fp32 for a bf16/fp16 gradient (kept in its own dtype
    and widened slice by slice), else the gradient's."""
    return torch.promote_types(dtype, torch.float32)


def _slice_scratch(matrix: torch.Tensor) -> torch.Tensor:
    """One buffer for a row slice of ``matrix`` in the work dtype, reused slice after slice: a
    fresh slice-sized tensor per slice would be a malloc and, above glibc's mmap threshold,
    fresh pages each time."""
    first = _row_slices(matrix)[0] if matrix.numel() else matrix
    return torch.empty(first.shape, dtype=_work_dtype(matrix.dtype), device=matrix.device)


def _squares_into(rows: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``rows**2`` in ``scratch`` (the work dtype): a bf16 slice is widened first, because
    ``torch.square(bf16, out=fp32)`` squares in bf16 and rounds."""
    out = scratch[: rows.shape[0]]
    if rows.dtype == out.dtype:
        return torch.square(rows, out=out)
    return out.copy_(rows).square_()


def _sums_of_squares(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix**2).sum(dim=1)`` and ``(matrix**2).sum(dim=0)`` with no full-size temporary.

    On a CPU ``vector_norm(matrix, dim=0)`` is a strided reduction about 20-24x slower than
    summing row slices on vocabulary-shaped matrices (``benchmarks/column_sums.py``: 370 ms
    against 15 ms on 32000 x 1024, one thread); it was most of the factored rule's time. The
    slices also give both sums in one pass over the matrix, each slice squared while it is in
    cache. Other devices keep the two reductions (a loop of small kernels there would pay a
    launch per slice, and no GPU has measured the strided one as slow), but for a bf16/fp16
    matrix: asking ``vector_norm`` for fp32 widens the whole matrix first, so that one goes by
    large slices.
    """
    if _on_accelerator(matrix) and not _low_precision(matrix):
        return (
            torch.linalg.vector_norm(matrix, dim=1).square_(),
            torch.linalg.vector_norm(matrix, dim=0).square_(),
        )
    work = _work_dtype(matrix.dtype)
    row_sums = torch.empty(matrix.shape[0], dtype=work, device=matrix.device)
    col_sums = torch.zeros(matrix.shape[1], dtype=work, device=matrix.device)
    start = 0
    scratch = _slice_scratch(matrix)
    for rows in _row_slices(matrix):
        squares = _squares_into(rows, scratch)
        torch.sum(squares, dim=1, out=row_sums[start : start + rows.shape[0]])
        col_sums.add_(squares.sum(dim=0))
        start += rows.shape[0]
    return row_sums, col_sums


def _scale_rows_and_columns(
    matrix: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new ``matrix * row_scale[:, None] * col_scale[None, :]`` and its sum of squares: on a
    CPU one pass over ``matrix`` (each slice scaled and summed while in cache), elsewhere
    three fused kernels."""
    if _on_accelerator(matrix):  # a bf16 matrix times fp32 scales: fp32, widened in-kernel
        out = torch.mul(matrix, row_scale[:, None]).mul_(col_scale)
        return out, torch.linalg.vector_norm(out).square_()
    out = torch.empty(matrix.shape, dtype=_work_dtype(matrix.dtype), device=matrix.device)
    slices = _scaled_slices(matrix, row_scale, col_scale, _row_slices(out))
    return out, _sum_of_squares(slices, out.dtype, out.device)


def _scaled_slices(
    matrix: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    into: Iterable[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """``matrix * row_scale[:, None] * col_scale[None, :]`` row slice by row slice (CPU), each
    written into the matching slice of ``into`` (an output's slices) or, by default, into one
    reused scratch buffer (valid until the next slice). Every user of the factored direction
    goes through here, so their entries and the clip's sums agree bit for bit."""
    targets = into if into is not None else itertools.repeat(_slice_scratch(matrix))
    for rows, scale, target in zip(
        _row_slices(matrix), _row_slices(row_scale[:, None], matrix.shape[1]), targets
    ):
        yield torch.mul(rows, scale, out=target[: rows.shape[0]]).mul_(col_scale)


def _sum_of_squares(
    slices: Iterable[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The sum of squares of every entry of ``slices``, one slice's norm at a time."""
    total = torch.zeros((), dtype=dtype, device=device)
    for piece in slices:
        total.add_(torch.linalg.vector_norm(piece).square_())
    return total


def _clip_rms(update: torch.Tensor, squares: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """``update`` divided by its root mean square when that exceeds 1 (Adafactor's clip), in
    place; ``squares`` is its sum of squares over ``numel`` entries (``update``'s own count by
    default; a row-sparse update's is its whole matrix's, the other rows being zeros). A CPU
    skips the pass when the RMS is at most 1 (usual in steady training; dividing by 1 would
    change nothing); elsewhere it stays unconditional, as a host check would wait for the device."""
    rms = (squares / (update.numel() if numel is None else numel)).sqrt_()
    if update.device.type == "cpu" and not bool(rms > 1.0):
        return update
    return update.div_(rms.clamp(min=1.0))


@dataclass(frozen=True)
class Shards:
    """How a gradient is split over FSDP2 ranks, for a rule whose statistics span the whole
    tensor: each rank holds whole rows (a dim-0 chunk) and ``sum_`` adds a tensor over the
    ranks in place (an all-reduce; every rank calls it in the same order).

    Attributes:
        rows: Rows of the whole tensor (a matrix's every dimension but the last multiplied; a
            vector's entries).
        numel: Entries of the whole tensor.
        sum_: Sums a tensor over the ranks, in place.
    """

    rows: int
    numel: int
    sum_: Callable[[torch.Tensor], object]


def _weighted_column_sums(matrix: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``(matrix**2 * row_weights[:, None]).sum(dim=0)`` slice by slice, with no full-size
    temporary (the square of a whole FSDP2 shard would be one): on a CPU each slice squared
    and weighted while in cache, on an accelerator a matrix-vector product per 4M-entry slice."""
    accelerator = _on_accelerator(matrix)
    sums = torch.zeros(matrix.shape[1], dtype=_work_dtype(matrix.dtype), device=matrix.device)
    scratch = _slice_scratch(matrix)
    for rows, weights in zip(
        _row_slices(matrix), _row_slices(row_weights[:, None], matrix.shape[1])
    ):
        squares = _squares_into(rows, scratch)
        if accelerator:
            sums.addmv_(squares.T, weights[:, 0])
        else:
            sums.add_(squares.mul_(weights).sum(dim=0))
    return sums


@runtime_checkable
class RestRule(Protocol):
    """The direction of the state-free step of a candidate's unselected coordinates.

    ``direction`` gets the gradient (this rank's shard under FSDP2, whose shards are whole rows)
    and returns a tensor of its shape; the step is ``param -= lr * rest_lr_scale * direction``.
    Entries at selected coordinates are ignored (Adam updates those). It should be invariant to
    a positive scale of ``grad`` for clipping to leave the rest step alone (sign and colnorm are).

    A rule with state defines ``init_state(grad) -> dict[str, Tensor]`` too; ``direction`` is
    then called as ``direction(grad, state)`` with that tensor's state, which the optimizer keeps
    for every candidate, checkpoints and counts as optimizer state.

    A stateful rule may also define ``prepare(grad, state) -> FactoredStep`` for matrices (as
    :class:`FactoredRest` does); on a CPU the optimizer then steps a full-precision matrix with
    it in place (no full-size direction) or, for an embedding, on the batch's rows only.

    A stateful rule runs under FSDP2 only if it sets ``supports_shards = True``: it is then
    called with ``shards=`` (:class:`Shards`) and must do all its communication inside that
    call, on every rank, whatever the gradient holds (a rank that skips a collective hangs
    the others).
    """

    def direction(self, grad: torch.Tensor) -> torch.Tensor: ...


class SignRest:
    """``rest="sign"``: signSGD, ``sign(g)`` (0 where the gradient is 0)."""

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.sign(grad)


class ColumnNormRest:
    """``rest="colnorm"``: every row (the last dimension) scaled to unit root mean square."""

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        work = grad.float() if grad.dtype in (torch.bfloat16, torch.float16) else grad
        rows = work.reshape(-1, work.shape[-1]) if work.dim() >= 2 else work.reshape(-1, 1)
        rms = rows.square().mean(dim=1, keepdim=True).sqrt_().clamp_(min=_RMS_FLOOR)
        return (rows / rms).reshape(grad.shape).to(grad.dtype)


class FactoredRest:
    """``rest="factored"``: Adafactor without momentum, a second moment of O(rows + columns).

    ``direction = g / sqrt(v)`` where ``v`` is the rank-1 factored, bias-corrected EMA (``beta2``)
    of ``g**2``: per row and per column means, ``v = row x col / mean(row)``. A vector keeps a
    full EMA (it is small). The direction's RMS is clipped to 1, as Adafactor does. Unlike sign
    and colnorm it keeps the relative size of a row's entries *over time*, which rare-token rows
    of a vocabulary matrix need. Its state (two vectors per matrix) counts as optimizer state.
    The factors are running statistics, not a plain function of this step's gradient, so a
    clip coefficient that varies from step to step would change them: the rule is nearly, not
    exactly, scale-invariant. The optimizer never clips what it sees (measured: statistics of
    clipped gradients were 0.4 % worse on tiny over three seeds, level on llama-20m over two;
    benchmarks/README.md "0.6.5").

    Under FSDP2 (``shards=``) each rank holds whole rows: the row statistics stay local, and one
    all-reduce per tensor adds up what spans the ranks (the column sums, the row statistics'
    sum for their mean, and the clip's sum of squares, read from a weighted column sum so that
    it needs no second collective). The direction then equals one process's to rounding. A
    non-finite gradient on any rank leaves the statistics alone and gives a zero direction on
    every rank, so the replicated column statistics stay identical.
    """

    supports_shards = True

    def __init__(self, beta2: float = 0.99, eps: float = 1e-30) -> None:
        self.beta2 = beta2
        self.eps = eps

    def init_state(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        device = grad.device
        if grad.dim() >= 2:
            rows = grad.reshape(-1, grad.shape[-1]).shape[0]
            return {
                "row": torch.zeros(rows, device=device),
                "col": torch.zeros(grad.shape[-1], device=device),
                "step": torch.zeros((), device=device),
            }
        return {"full": torch.zeros(grad.shape, device=device), "step": torch.zeros((), device=device)}

    def direction(
        self, grad: torch.Tensor, state: dict[str, torch.Tensor], shards: Shards | None = None
    ) -> torch.Tensor:
        if "full" in state:
            before = None if shards is None else {k: v.clone() for k, v in state.items()}
            g = grad.float()
            correction = self._count_step(state)
            state["full"].lerp_(g.square().add_(self.eps), 1 - self.beta2)
            update = g / (state["full"] / correction).sqrt()
            squares = torch.linalg.vector_norm(update).square_()
            if shards is None:
                return _clip_rms(update, squares).to(grad.dtype)
            squares = squares.reshape(1)
            shards.sum_(squares)
            finite = torch.isfinite(squares[0])
            _keep_unless(finite, state, before)
            clipped = _clip_rms(update, squares[0], shards.numel)
            return torch.where(finite, clipped, 0.0).to(grad.dtype)
        return self.prepare(grad, state, shards).dense().reshape(grad.shape).to(grad.dtype)

    def prepare(
        self, grad: torch.Tensor, state: dict[str, torch.Tensor], shards: Shards | None = None
    ) -> FactoredStep:
        """This step of a matrix, its statistics updated, before any full-size tensor is built:
        :class:`FactoredStep` writes it out whole (what :meth:`direction` returns), on its live
        rows only, or straight into the weight."""
        if shards is not None:
            return self._prepare_shard(grad, state, shards)
        correction = self._count_step(state)
        matrix = _matrix_of(grad, state)
        rows, cols = matrix.shape
        row_sums, col_sums = _sums_of_squares(matrix)
        live = row_sums != 0
        state["row"].lerp_(row_sums.div_(cols).add_(self.eps), 1 - self.beta2)
        state["col"].lerp_(col_sums.div_(rows).add_(self.eps), 1 - self.beta2)
        row, col = state["row"] / correction, state["col"] / correction
        return FactoredStep(matrix, row.div_(row.mean()).rsqrt_(), col.rsqrt_(), live)

    def _prepare_shard(
        self, grad: torch.Tensor, state: dict[str, torch.Tensor], shards: Shards
    ) -> FactoredStep:
        """:meth:`prepare` on this rank's rows, with one all-reduce.

        The clip needs the direction's sum of squares, ``sum_ij g_ij**2 a_i**2 b_j**2``, where
        ``a_i**2 = mean(row) / row_i`` and ``b_j**2 = 1 / col_j`` are known only after the sums
        over the ranks. Written as ``mean(row) * sum_j (sum_i g_ij**2 / row_i) / col_j``, its
        inner sums need only this rank's rows, so they travel in the same all-reduce.
        """
        before = {key: value.clone() for key, value in state.items()}
        correction = self._count_step(state)
        matrix = _matrix_of(grad, state)
        cols = matrix.shape[1]
        row_sums, col_sums = _sums_of_squares(matrix)
        live = row_sums != 0
        state["row"].lerp_(row_sums.div_(cols).add_(self.eps), 1 - self.beta2)
        row = state["row"] / correction
        # One buffer, one collective: the column sums, the weighted column sums, sum(row).
        totals = torch.cat([col_sums, _weighted_column_sums(matrix, row.reciprocal()), row.sum()[None]])
        shards.sum_(totals)
        finite = torch.isfinite(totals).all()
        col_sums, weighted, row_total = totals[:cols], totals[cols:-1], totals[-1]
        state["col"].lerp_(col_sums.div_(shards.rows).add_(self.eps), 1 - self.beta2)
        _keep_unless(finite, state, before)
        mean = row_total / shards.rows
        col = state["col"] / correction
        squares = torch.where(finite, mean * (weighted / col).sum(), 0.0)
        # Both scales zero when anything was non-finite: the restored column statistics may
        # be zeros (a first step), whose inverse root is inf, and 0 * inf would be NaN.
        row_scale = torch.where(finite, row.div_(mean).rsqrt_(), 0.0)
        col_scale = torch.where(finite, col.rsqrt_(), 0.0)
        return FactoredStep(matrix, row_scale, col_scale, live, squares, shards.numel)

    def _count_step(self, state: dict[str, torch.Tensor]) -> float | torch.Tensor:
        """Advances the step count; returns the bias correction of this step: on an
        accelerator a device scalar (reading the count on the host would wait for the
        device), computed in float64 as the CPU's Python float is, so the same value (in
        float32 on Apple's MPS, which has no float64)."""
        step = state["step"]
        step += 1
        if _on_accelerator(step):
            wide = torch.float32 if step.device.type == "mps" else torch.float64
            return (1 - torch.pow(self.beta2, step.to(wide))).float()
        return 1 - self.beta2 ** float(step)


def _matrix_of(grad: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient as the ``rows x columns`` matrix the statistics describe. A bf16/fp16
    gradient stays in its dtype: every pass over it widens one slice at a time, or in-kernel,
    so no fp32 copy of the largest matrix sits at the backward's peak."""
    shape = (state["row"].numel(), state["col"].numel())
    if _low_precision(grad):
        return grad.reshape(shape)
    return grad.float().reshape(shape)


def _keep_unless(finite: torch.Tensor, state: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    """``state`` back to ``before`` (step counter included) unless ``finite``, without a host
    sync: on a shard, a non-finite gradient on any rank changes no rank's statistics, so the
    replicated ones (columns, step counters) stay the same on every rank."""
    for key, value in before.items():
        state[key].copy_(torch.where(finite, state[key], value))


class FactoredStep:
    """The factored direction of one matrix at one step, ``g / sqrt(v)`` written as
    ``g * a_i * b_j`` (``a = (row / mean(row))**-1/2``, ``b = col**-1/2``: no outer product of the
    factors), then divided by its RMS where that exceeds 1 (Adafactor's clip).

    Three ways to use it, the same arithmetic per entry (the clip's sum of squares aside, whose
    summation order differs): :meth:`dense` builds it (over a 32k x 1024 vocabulary matrix a
    full-size tensor is 131 MB at the backward's peak); :meth:`live_rows` builds it on the rows
    whose gradient is not all zero (an embedding's: the batch's tokens; a CPU's only, as
    finding them is a host read); :meth:`apply_` steps a weight with it slice by slice, with no
    full-size tensor at all.

    On an accelerator (:attr:`sync_free`) nothing waits for the device: the clip always
    divides (by the RMS clamped at 1, and ``x / 1`` is ``x`` exactly) where a CPU skips the
    pass when it would divide by 1, and a non-finite gradient is masked, not branched on.

    ``squares`` and ``numel``: the whole tensor's sum of squares of the direction and entry
    count, when ``matrix`` is one FSDP2 shard of it (the clip is the whole tensor's); None: the
    matrix is whole and its own sums are used.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        row_scale: torch.Tensor,
        col_scale: torch.Tensor,
        live: torch.Tensor,
        squares: torch.Tensor | None = None,
        numel: int | None = None,
    ) -> None:
        self.matrix, self.row_scale, self.col_scale, self.live = matrix, row_scale, col_scale, live
        self.squares, self.numel = squares, numel

    @property
    def sync_free(self) -> bool:
        """Whether this step avoids host reads (the matrix is on an accelerator)."""
        return _on_accelerator(self.matrix)

    @property
    def work_dtype(self) -> torch.dtype:
        """The direction's dtype (fp32 for a bf16 gradient)."""
        return _work_dtype(self.matrix.dtype)

    def dense(self) -> torch.Tensor:
        """The direction, a new tensor of the matrix's shape."""
        update, squares = _scale_rows_and_columns(self.matrix, self.row_scale, self.col_scale)
        if self.squares is not None:
            return _clip_rms(update, self.squares, self.numel)
        return _clip_rms(update, squares)

    def live_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, values)``: the row ids (sorted) whose gradient is not all zero, and the
        direction on them (it is zero on every other row); None when most rows are live, where
        the gather would cost more than it saves. A row counts as zero when its squares sum to
        zero (entries below about 1e-23 underflow)."""
        rows = self.live.nonzero().squeeze(1)
        if 2 * rows.numel() > self.matrix.shape[0]:
            return None
        values, squares = _scale_rows_and_columns(
            self.matrix.index_select(0, rows), self.row_scale.index_select(0, rows), self.col_scale
        )
        if self.squares is not None:
            return rows, _clip_rms(values, self.squares, self.numel)
        return rows, _clip_rms(values, squares, self.matrix.numel())

    def apply_(
        self,
        weight: torch.Tensor,
        lr: float | torch.Tensor,
        decay: float = 0.0,
        subtract: Callable[[torch.Tensor, torch.Tensor], object] | None = None,
        finite: torch.Tensor | None = None,
    ) -> None:
        """``weight -= lr * direction + decay * weight`` in place, slice by slice: ``weight`` is
        a contiguous matrix of the gradient's shape.

        Two passes over the gradient instead of the dense path's five and a full-size
        allocation: one for the clip's sum of squares (:meth:`clip_rms`), one for the step, each
        slice's direction built while in cache (on an accelerator: in a few large slices, so
        the largest temporary is a slice's, not the matrix's). ``subtract(weights, step)``
        writes a slice's step (in the work dtype) into the weight's slice; by default
        ``weights -= step``, and a bf16 weight's caller passes its rounding. ``finite``: a
        0-dim bool tensor; where it is False every step is zero (a caller that cannot read it
        on the host without waiting for the device).
        """
        rms = self.clip_rms
        skip = None if finite is None else ~finite
        for step, weights in zip(
            _scaled_slices(self.matrix, self.row_scale, self.col_scale), _row_slices(weight)
        ):
            if rms is not None:
                step.div_(rms)
            step.mul_(lr)
            if decay:
                step.add_(weights, alpha=decay)
            if skip is not None:
                step.masked_fill_(skip, 0.0)
            if subtract is None:
                weights.sub_(step)
            else:
                subtract(weights, step)

    def at(self, coordinates: torch.Tensor) -> torch.Tensor:
        """The direction at flat ``coordinates`` (int64), in their order, clip included."""
        cols = self.matrix.shape[1]
        values = self.matrix.reshape(-1)[coordinates] * self.row_scale[coordinates // cols]
        values.mul_(self.col_scale[coordinates % cols])
        rms = self.clip_rms
        return values if rms is None else values.div_(rms)

    def at_selected(self, selected: torch.Tensor | RowCoordinates) -> torch.Tensor:
        """The direction at ``selected`` in layout order (as ``gather`` lays them out), clip
        included: :meth:`at` over ``selected.long()``, entry for entry, but whole rows are
        scaled as rows, without the flat int64 index and its quotient and remainder (24 bytes
        per kept coordinate: on a selecting step's shortlisted head, most of its excess)."""
        if not isinstance(selected, RowCoordinates) or selected.row_size != self.matrix.shape[1]:
            return self.at(selected.long())
        rows = selected.rows.long()
        out = torch.empty(selected.numel(), dtype=self.work_dtype, device=self.matrix.device)
        split = rows.numel() * selected.row_size
        block = out[:split].view(-1, selected.row_size)
        torch.mul(self.matrix.index_select(0, rows), self.row_scale.index_select(0, rows)[:, None], out=block)
        block.mul_(self.col_scale)
        rms = self.clip_rms
        if rms is not None:
            block.div_(rms)
        if selected.extra.numel():
            out[split:] = self.at(selected.extra.long())
        return out

    @functools.cached_property
    def clip_rms(self) -> torch.Tensor | None:
        """What the clip divides by: on a CPU the direction's RMS when it exceeds 1, else None
        (no pass that divides by 1); on an accelerator the RMS clamped at 1, always (no host
        read). A pass of its own over the same slices as :meth:`dense`'s sum on a CPU, so the
        in-place step equals the dense one bit for bit; none on a shard, whose whole tensor's
        sum came with it."""
        if self.squares is not None:
            rms = (self.squares / self.numel).sqrt()
        else:
            slices = _scaled_slices(self.matrix, self.row_scale, self.col_scale)
            squares = _sum_of_squares(slices, self.work_dtype, self.matrix.device)
            rms = (squares / self.matrix.numel()).sqrt_()
        if self.sync_free:
            return rms.clamp_(min=1.0)
        return rms if bool(rms > 1.0) else None


REST_RULES = {"none": None, "sign": SignRest, "colnorm": ColumnNormRest, "factored": FactoredRest}


def make_rest_rule(spec: str | RestRule, factored_beta2: float) -> RestRule | None:
    """The rule ``spec`` names (None for ``"none"``), or ``spec`` itself when an object;
    ``"factored"`` with its second moment's decay ``factored_beta2``.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(spec, str):
        return spec
    if spec not in REST_RULES:
        raise ValueError(f"Invalid rest: {spec!r} (choose from {', '.join(map(repr, REST_RULES))})")
    if spec == "factored":
        return FactoredRest(beta2=factored_beta2)
    rule = REST_RULES[spec]
    return None if rule is None else rule()


def _resolve_auto(spec: str | RestRule | None) -> str | RestRule | None:
    """``"auto"`` is ``"factored"``, for ``rest`` and ``vocab_rest`` alike, on one process and
    under FSDP2 (which sums the rule's column statistics over the ranks: :class:`Shards`).

    For ``rest`` its short memory (``factored_beta2`` 0.99) beat ``"sign"`` on every matrix by
    1.7-2.3 % of the eval loss in pretraining; on the embedding and head, whose rare-token rows
    see a gradient now and then, its per-row and per-column second moment keeps their step in
    proportion (on pretrain-cpu it took sign's eval loss from +14 % to +1 % of AdamW's;
    benchmarks/README.md).
    """
    return "factored" if spec == "auto" else spec


def rest_rules_for(
    rest: str | RestRule, vocab_rest: str | RestRule | None, factored_beta2: float
) -> tuple[RestRule | None, RestRule | None]:
    """The rule of every candidate and the one that replaces it on the vocabulary matrices
    (the embedding and head), ``"auto"`` resolved: ``(None, None)`` when ``rest`` is ``"none"``
    (nothing is stepped), and no vocabulary rule when ``vocab_rest`` is None (rest's applies).
    The optimizer and ``blockllm estimate`` both build their rules here.

    Raises:
        ValueError: an unknown name.
    """
    rule = make_rest_rule(_resolve_auto(rest), factored_beta2)
    vocab = _resolve_auto(vocab_rest)
    if rule is None or vocab is None:
        return rule, None
    return rule, make_rest_rule(vocab, factored_beta2)


__all__ = [
    "REST_RULES",
    "ColumnNormRest",
    "FactoredRest",
    "FactoredStep",
    "RestRule",
    "Shards",
    "SignRest",
    "make_rest_rule",
    "rest_rules_for",
]
