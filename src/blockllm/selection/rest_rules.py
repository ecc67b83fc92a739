"""State-free update rules for the candidate coordinates Adam does not update ("the rest").

BlockLLM keeps Adam moments for the gradient-selected block only. With ``rest="none"`` (the
paper's method) every other candidate is frozen until it is selected. With a state-free rule
every other candidate coordinate moves every step too, by ``lr * rest_lr_scale * direction(g)``
(plus decoupled weight decay), where ``direction`` needs nothing but the current gradient:

* ``"sign"``: ``sign(g)`` (signSGD; FRUGAL's rule for the non-Adam part);
* ``"colnorm"``: each output row of a matrix divided by its root mean square (SCALE's
  column-normalised SGD; for ``nn.Linear`` weights, shaped ``(out, in)``, a row is one output
  unit's incoming weights). A vector (a bias, a norm's gain) is read as ``(out, 1)``, one weight
  per output, so its direction is its sign; this keeps every row whole on one FSDP2 shard.

Both directions are invariant to the gradient's scale, so clipping by a global norm (or a loss
scaler) does not change the rest step; it only changes Adam's part. A rule is a small object and
users can plug in their own (``rest=MyRule()``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

# Root mean squares below this are treated as zero gradient rows: no movement, no blow-up.
_RMS_FLOOR = 1e-8
# Elements per slice when summing squares down the columns on a CPU (see below): large enough
# that the per-slice overhead vanishes, small enough that the slice's square stays in cache.
_COLUMN_SLICE_ELEMENTS = 1 << 18


def _row_slices(matrix: torch.Tensor, columns: int | None = None) -> tuple[torch.Tensor, ...]:
    """Slices of whole rows, about ``_COLUMN_SLICE_ELEMENTS`` each for ``columns`` columns
    (``matrix``'s own by default), so that slices of several tensors line up."""
    width = matrix.shape[1] if columns is None else columns
    return matrix.split(max(16, _COLUMN_SLICE_ELEMENTS // max(1, width)))


def _sums_of_squares(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix**2).sum(dim=1)`` and ``(matrix**2).sum(dim=0)`` with no full-size temporary.

    On a CPU ``vector_norm(matrix, dim=0)`` is a strided reduction about 20-24x slower than
    summing row slices on vocabulary-shaped matrices (``benchmarks/column_sums.py``: 370 ms
    against 15 ms on 32000 x 1024, one thread); it was most of the factored rule's time. The
    slices also give both sums in one pass over the matrix, each slice squared while it is in
    cache. Other devices keep the two reductions: a loop of small kernels there would pay a
    launch per slice, and no GPU has measured the strided one as slow.
    """
    if matrix.device.type != "cpu":
        return (
            torch.linalg.vector_norm(matrix, dim=1).square_(),
            torch.linalg.vector_norm(matrix, dim=0).square_(),
        )
    row_sums = torch.empty(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    col_sums = torch.zeros(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    start = 0
    for rows in _row_slices(matrix):
        squares = rows.square()
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
    if matrix.device.type != "cpu":
        out = torch.mul(matrix, row_scale[:, None]).mul_(col_scale)
        return out, torch.linalg.vector_norm(out).square_()
    out = torch.empty_like(matrix)
    total = torch.zeros((), dtype=out.dtype)
    for rows, scale, into in zip(
        _row_slices(matrix), _row_slices(row_scale[:, None], matrix.shape[1]), _row_slices(out)
    ):
        torch.mul(rows, scale, out=into).mul_(col_scale)
        total.add_(torch.linalg.vector_norm(into).square_())
    return out, total


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

    A stateful rule whose direction is zero wherever a matrix's gradient row is all zero may
    also define ``direction_rows(grad, state) -> (rows, values)`` (:meth:`FactoredRest.direction_rows`),
    which the optimizer uses on a CPU for undecayed full-precision matrices, so that an
    embedding steps only the rows of the batch's tokens.
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
    clip coefficient changes them slightly: the rule is nearly, not exactly, scale-invariant.
    """

    def __init__(self, beta2: float = 0.999, eps: float = 1e-30) -> None:
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

    def direction(self, grad: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        g = grad.float()
        correction = self._count_step(state)
        if "full" in state:
            state["full"].lerp_(g.square().add_(self.eps), 1 - self.beta2)
            update = g / (state["full"] / correction).sqrt()
            return _clip_rms(update, torch.linalg.vector_norm(update).square_()).to(grad.dtype)
        # The update is the only full-size tensor this builds (over a 32k x 1024 vocabulary
        # matrix each full-size temporary is 131 MB at the backward's peak), and it is written
        # in one pass: g / sqrt(row_i col_j / mean(row)) as g * a_i * b_j with
        # a = (row / mean(row))**-1/2, b = col**-1/2, no outer product of the factors.
        matrix = g.reshape(state["row"].numel(), -1)
        row_scale, col_scale, _ = self._factors(matrix, state, correction)
        update, squares = _scale_rows_and_columns(matrix, row_scale, col_scale)
        return _clip_rms(update.reshape(g.shape), squares).to(grad.dtype)

    def direction_rows(
        self, grad: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """:meth:`direction` of a matrix as ``(rows, values)``: the row ids (sorted) where the
        gradient is not all zero and the direction on those rows only; elsewhere it is zero.

        An embedding's gradient is zero outside the batch's tokens (on a 32,000-token
        vocabulary at most 2,048 rows for a batch of 2,048 tokens), so writing, scaling and
        applying only those rows skips most of the step's passes over the matrix. The
        statistics are updated exactly as :meth:`direction` updates them. When most rows are
        live the gather costs more than it saves: ``(None, direction)`` then, the dense result.
        A row counts as zero when its squares sum to zero (entries below about 1e-23 underflow).
        """
        g = grad.float()
        correction = self._count_step(state)
        matrix = g.reshape(state["row"].numel(), -1)
        row_scale, col_scale, live = self._factors(matrix, state, correction)
        rows = live.nonzero().squeeze(1)
        if 2 * rows.numel() > matrix.shape[0]:
            update, squares = _scale_rows_and_columns(matrix, row_scale, col_scale)
            return None, _clip_rms(update.reshape(g.shape), squares).to(grad.dtype)
        values, squares = _scale_rows_and_columns(
            matrix.index_select(0, rows), row_scale.index_select(0, rows), col_scale
        )
        return rows, _clip_rms(values, squares, matrix.numel()).to(grad.dtype)

    def _count_step(self, state: dict[str, torch.Tensor]) -> float:
        """Advances the step count; returns the bias correction of this step."""
        state["step"] += 1
        return 1 - self.beta2 ** float(state["step"])

    def _factors(
        self, matrix: torch.Tensor, state: dict[str, torch.Tensor], correction: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Updates the row and column statistics with ``matrix``'s squares; returns the row and
        column scales of the direction and which rows of ``matrix`` have a nonzero square."""
        rows, cols = matrix.shape
        row_sums, col_sums = _sums_of_squares(matrix)
        live = row_sums != 0
        state["row"].lerp_(row_sums.div_(cols).add_(self.eps), 1 - self.beta2)
        state["col"].lerp_(col_sums.div_(rows).add_(self.eps), 1 - self.beta2)
        row, col = state["row"] / correction, state["col"] / correction
        return row.div_(row.mean()).rsqrt_(), col.rsqrt_(), live


REST_RULES = {"none": None, "sign": SignRest, "colnorm": ColumnNormRest, "factored": FactoredRest}


def make_rest_rule(spec: str | RestRule) -> RestRule | None:
    """The rule ``spec`` names (None for ``"none"``), or ``spec`` itself when an object.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(spec, str):
        return spec
    if spec not in REST_RULES:
        raise ValueError(f"Invalid rest: {spec!r} (choose from {', '.join(map(repr, REST_RULES))})")
    rule = REST_RULES[spec]
    return None if rule is None else rule()


__all__ = [
    "REST_RULES",
    "ColumnNormRest",
    "FactoredRest",
    "RestRule",
    "SignRest",
    "make_rest_rule",
]
