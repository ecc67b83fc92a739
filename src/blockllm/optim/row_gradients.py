"""Row-sparse weight gradients for partly selected embeddings and output heads.

When BlockLLM trains only some rows of a vocabulary matrix, autograd still computes that matrix's
whole weight gradient: for an output head a ``(vocab, hidden)`` matrix product as large as the
head's forward, for an embedding a dense ``(vocab, hidden)`` buffer, and all of it is thrown away
again but for the selected rows. On Gemma-3-270M (262k-token tied embedding) that is a 670 MB
gradient and a quarter of the step's arithmetic per step.

:class:`RowGradients` (``RowGradients(model, optimizer)``) switches the model's plain
``nn.Linear``/``nn.Embedding`` modules whose weight is a candidate to subclasses whose backward asks
it which rows the optimizer trains. When it trains a few rows of that weight (an ordinary step),
only those rows' gradient is computed, gathered to the selected coordinates and handed to the
optimizer, which keeps it as a compacted gradient (``compact_grads``); the weight's ``.grad``
stays empty. On a selection step, or when the weight is selected whole or not at all, the
backward is autograd's own, so selection and the update see exactly what they would without the
patch. The input gradient is always computed in full.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from blockllm.optim.blockllm import BlockLLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowTarget:
    """The rows of a weight whose gradient is wanted, and where its selected coordinates lie.

    Attributes:
        rows: sorted rows holding at least one selected coordinate.
        positions: for each selected coordinate (in the selection's order), its flat index into
            the ``(len(rows), row_size)`` block of those rows' gradient.
        num_rows: rows of the whole weight.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    num_rows: int

    @functools.cached_property
    def row_lookup(self) -> torch.Tensor:
        """Row of the weight -> its position in ``rows``, -1 for rows not wanted.

        Built once per selection (the optimizer keeps the target while the selection lasts).
        """
        lookup = torch.full((self.num_rows,), -1, dtype=torch.long, device=self.rows.device)
        lookup[self.rows] = torch.arange(self.rows.numel(), device=self.rows.device)
        return lookup


def row_target(coordinates: torch.Tensor, shape: torch.Size) -> RowTarget:
    """The :class:`RowTarget` of flat ``coordinates`` into a weight of ``shape``."""
    row_size = shape[1:].numel()
    flat = coordinates.long()
    row_of = torch.div(flat, row_size, rounding_mode="floor")
    rows = torch.unique(row_of)  # sorted
    positions = torch.searchsorted(rows, row_of) * row_size + (flat - row_of * row_size)
    return RowTarget(rows, positions, shape[0])


class RowGradientSink(Protocol):
    """What the patched modules ask of their handle (:class:`RowGradients` implements it)."""

    def row_target(self, weight: torch.Tensor) -> RowTarget | None: ...

    def add_compact_grad(self, weight: torch.Tensor, grad: torch.Tensor) -> None: ...


class _RowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, inputs, weight, bias, sink_ref):
        ctx.save_for_backward(inputs, weight)
        ctx.sink_ref = sink_ref
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output):
        inputs, weight = ctx.saved_tensors
        # Under autocast the forward ran in low precision; do the backward in that dtype too.
        dtype = grad_output.dtype
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_inputs = (grad_output @ weight.to(dtype)).to(inputs.dtype)
        if ctx.needs_input_grad[1]:
            inputs_2d = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
            sink: RowGradientSink | None = ctx.sink_ref()
            target = None if sink is None else sink.row_target(weight)
            if target is None:
                grad_weight = (grad_2d.t() @ inputs_2d).to(weight.dtype)
            else:
                block = grad_2d.index_select(1, target.rows).t() @ inputs_2d
                sink.add_compact_grad(weight, block.reshape(-1)[target.positions].to(weight.dtype))
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_inputs, grad_weight, grad_bias, None


class _RowEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, indices, weight, padding_idx, sink_ref):
        ctx.save_for_backward(indices, weight)
        ctx.padding_idx = padding_idx
        ctx.sink_ref = sink_ref
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_output):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        indices, weight = ctx.saved_tensors
        padding = -1 if ctx.padding_idx is None else ctx.padding_idx
        sink: RowGradientSink | None = ctx.sink_ref()
        target = None if sink is None else sink.row_target(weight)
        if target is None:
            grad = torch.ops.aten.embedding_dense_backward(
                grad_output, indices, weight.shape[0], padding, False
            )
            return None, grad.to(weight.dtype), None, None
        flat_indices = indices.reshape(-1)
        grad_2d = grad_output.reshape(flat_indices.numel(), -1)
        where = target.row_lookup[flat_indices]
        keep = where >= 0
        if ctx.padding_idx is not None:
            keep &= flat_indices != ctx.padding_idx
        block = grad_2d.new_zeros(target.rows.numel(), grad_2d.shape[1])
        block.index_add_(0, where[keep], grad_2d[keep])
        sink.add_compact_grad(weight, block.reshape(-1)[target.positions].to(weight.dtype))
        return None, None, None, None


class _Patched:
    """Mixin of the patched module classes: the sink is a weak reference held by the module.

    Swapping the module's class (rather than assigning a closure to ``module.forward``) keeps
    ``copy.deepcopy`` right: a copy's weight is another tensor, which the optimizer does not
    know, so the copy falls back to autograd's own backward. Pickling drops the sink.
    """

    def _sink(self):
        reference = self.__dict__.get("_blockllm_sink")
        if reference is None or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return None
        return reference

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_blockllm_sink", None)
        return state


class RowGradientLinear(_Patched, nn.Linear):
    """``nn.Linear`` whose weight gradient goes through a BlockLLM optimizer's row target."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        reference = self._sink()
        if reference is None:
            return F.linear(inputs, self.weight, self.bias)
        return _RowLinear.apply(inputs, self.weight, self.bias, reference)


class RowGradientEmbedding(_Patched, nn.Embedding):
    """``nn.Embedding`` whose weight gradient goes through a BlockLLM optimizer's row target."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        reference = self._sink()
        if reference is None:
            return F.embedding(indices, self.weight, self.padding_idx)
        return _RowEmbedding.apply(indices, self.weight, self.padding_idx, reference)


_PATCHED = {nn.Linear: RowGradientLinear, nn.Embedding: RowGradientEmbedding}
_ORIGINAL = {patched: original for original, patched in _PATCHED.items()}


def patchable(module: nn.Module) -> bool:
    """Plain ``nn.Linear``/``nn.Embedding``, or one patched before (embeddings with norms,
    frequency scaling or sparse gradients keep their own backward)."""
    if type(module) in (nn.Linear, RowGradientLinear):
        return True
    return (
        type(module) in (nn.Embedding, RowGradientEmbedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


def patch_module(module: nn.Module, sink: RowGradientSink) -> None:
    """Route ``module``'s weight gradient through ``sink`` (see the module docstring)."""
    module._blockllm_sink = weakref.ref(sink)
    module.__class__ = _PATCHED.get(type(module), type(module))


def unpatch_module(module: nn.Module) -> None:
    """Give ``module`` its own class and forward back."""
    if type(module) in _ORIGINAL:
        module.__class__ = _ORIGINAL[type(module)]
        module.__dict__.pop("_blockllm_sink", None)


class RowGradients:
    """Row-sparse weight gradients for one model trained by one BlockLLM optimizer.

    Under the frozen rule (``optimizer.config.rest == "none"``), patches every plain
    ``nn.Linear``/``nn.Embedding`` of ``model`` whose weight is a candidate of ``optimizer``: on
    ordinary steps a partly selected output head then costs a matrix product over its selected
    rows instead of all of them, and no dense gradient of it (or of the embedding) is ever built.
    Selection steps, and weights selected whole or not at all, keep autograd's own backward. The
    gradients go where ``compact_grads`` puts them (clip with ``optimizer.clip_grad_norm_``).
    The optimizer keeps the handle alive; :meth:`remove` gives the modules their classes back.

    With any other ``rest`` (the default ``"auto"`` included) it patches nothing and ``patched``
    stays empty: the rest step needs every row's gradient, so the row product would save
    nothing. FSDP2 parameters are left alone too.

    Args:
        model: the model whose parameters ``optimizer`` was built on.
        optimizer: a :class:`~blockllm.BlockLLM` with ``compact_grads=True``.

    Attributes:
        patched: names of the patched modules.

    Raises:
        ValueError: the optimizer does not compact gradients.
    """

    def __init__(self, model: nn.Module, optimizer: BlockLLM) -> None:
        if not optimizer.compact_grads:
            raise ValueError(
                "RowGradients needs an optimizer with compact_grads=True: the row gradients are "
                "kept compacted, outside .grad"
            )
        self._optimizer = weakref.ref(optimizer)
        # Candidate index -> (the coordinates it was built for, its target).
        self._targets: dict[int, tuple[torch.Tensor, RowTarget | None]] = {}
        self._modules: list[nn.Module] = []
        self.patched: list[str] = []
        if optimizer.communicator.shards_parameters:
            return  # FSDP2: the weights are DTensors; autograd's backward stays
        if optimizer.config.rest != "none":
            # A rest rule steps every row of the unselected part, so every row's gradient is
            # needed: the row product would save nothing.
            logger.info("BlockLLM: row gradients off (rest=%r steps every row)", optimizer.config.rest)
            return
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(weight, torch.Tensor)
                and optimizer.candidate_index(weight) is not None
                and weight.ndim == 2
                and patchable(module)
            ):
                patch_module(module, self)
                self._modules.append(module)
                self.patched.append(name)
        # The modules hold only a weak reference to this handle; the optimizer keeps it alive.
        optimizer.compact_gradients.sources.append(self)
        kinds = sorted({type(module).__name__ for module in self._modules})
        logger.info(
            "BlockLLM: row gradients for %d modules (%s)", len(self.patched), ", ".join(kinds) or "none"
        )
        logger.debug("row gradients for: %s", ", ".join(self.patched))

    def remove(self) -> None:
        """Give every patched module its own class back."""
        for module in self._modules:
            unpatch_module(module)
        self._modules.clear()

    def row_target(self, weight: torch.Tensor) -> RowTarget | None:
        """The rows whose gradient ``weight`` needs now; None for autograd's whole gradient."""
        optimizer = self._optimizer()
        index = None if optimizer is None else optimizer.candidate_index(weight)
        if index is None or optimizer.selection_pending or optimizer.config.rest != "none":
            # Not ours, a selection step (every gradient is scored whole), or a rest rule, whose
            # step needs the unselected rows' gradient too.
            return None
        if weight._backward_hooks:
            # The user's own tensor hook (weight.register_hook) expects the weight's gradient:
            # it gets autograd's whole one rather than None.
            return None
        coordinates = optimizer.selector.selection.get(index)
        if coordinates is None:
            return None  # selected whole, or not selected
        cached = self._targets.get(index)
        if cached is not None and cached[0] is coordinates:
            return cached[1]
        target: RowTarget | None = row_target(coordinates, weight.shape)
        if 2 * target.rows.numel() > weight.shape[0]:
            target = None  # coordinates spread over most rows: the whole product is cheaper
        self._targets[index] = (coordinates, target)
        return target

    def add_compact_grad(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` (the selected coordinates' gradient of ``weight``) to what step() uses."""
        optimizer = self._optimizer()
        if optimizer is not None:
            optimizer.compact_gradients.add(optimizer.candidate_index(weight), grad)
