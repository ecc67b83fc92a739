"""The activation memory of one training step of a Llama-style decoder, counted tensor by tensor.

Activations are what autograd saves during the forward for the backward, plus the largest
buffers the backward makes on top of them. The count below names every tensor a Hugging Face
Llama layer saves under PyTorch's SDPA attention (read off ``saved_tensors_hooks`` and checked
against them for each precision by ``tests/app/planning``), per token unless said otherwise, with
``h`` the hidden size, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``, ``i`` the MLP width,
``V`` the vocabulary and ``a`` the bytes of an activation (4 in fp32, 2 in bf16):

* each RMSNorm: its input in fp32 (``4h``: the input itself, or its fp32 copy under bf16-pure),
  ``1/rms`` (4 bytes) and the normalised input before the weight (``a'h``: fp32 except under
  bf16-pure);
* the inputs of the linear layers that follow a norm: one tensor shared by q/k/v and one by
  gate/up (``2 * a h``); under autocast every linear casts its input to bf16 itself, so q, k, v,
  gate and up each save their own copy (``5 * 2h``); the output projection's input is the
  attention output below, stored once;
* attention: the rotated query and key, the value, the output (``a (2q + 2kv)``) and the
  log-sum-exp of each head (``4 * heads``); the flash/efficient kernels save no ``L x L`` matrix,
  and grouped-query attention keeps ``kv``-wide keys and values (``enable_gqa``);
* the SwiGLU MLP: gate and up outputs, the SiLU output and the product (``4 a i``);
* after the last layer: the final norm, the head's input, the log-probabilities of the loss
  (``F.cross_entropy`` saves ``V`` of them per token: fp32 under autocast, which runs the loss in
  fp32, else in the logits' dtype), the targets and the input ids (8 bytes each);
* once per step: the rotary ``cos``/``sin`` (``2 * seq_len * head_dim``) and, under autocast, the
  bf16 copy of every linear weight (2 bytes per coordinate), which autocast caches for the
  forward and the matrix products keep for the backward.

On top of the saved tensors the backward of the loss holds two more ``T x V`` buffers (the
gradients of the log-probabilities and of the logits) next to the saved log-probabilities: for a
large vocabulary the largest transient of the step, counted as ``loss_transient``.

With activation checkpointing (Hugging Face's, non-reentrant) a layer keeps only its input
(``T h`` in the residual stream's dtype) and recomputes the rest during the backward, one layer at
a time. The peak is the stored inputs plus the largest of three moments: the end of the forward
(the head's saved tensors, the logits, and under autocast its fp32 copy of them and every cached
bf16 weight copy, released when autocast ends), the loss's backward (the head's saved tensors and
the two ``T x V`` gradients) and one recomputed layer. Every number is an exact product of
integers: nothing is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model_shapes imports torch; `blockllm estimate --help` reads PRECISIONS
    from blockllm.app.planning.model_shapes import ModelShape

#: ``fp32``: everything fp32. ``bf16``: fp32 weights under bf16 autocast (``--precision bf16`` of
#: ``blockllm pretrain``). ``bf16-pure``: bf16 weights and activations, fp32 master copies.
PRECISIONS = ("fp32", "bf16", "bf16-pure")

_INDEX = 8  # an int64 token id (the embedding's input, the loss's target)
_FP32 = 4


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one training step.

    Attributes:
        saved: Bytes autograd saves during the forward (no checkpointing), parameters excluded.
        loss_transient: The two ``T x V`` gradients the loss's backward adds on top.
        checkpointed: The peak with activation checkpointing (everything included).
        per_layer: Bytes one decoder layer saves (part of ``saved``).
        head: Bytes saved after the last layer: final norm, head input, log-probabilities,
            targets and input ids (part of ``saved``).
        weight_copies: Autocast's bf16 copies of the linear weights (part of ``saved``; 0 unless
            the precision is ``bf16``).
    """

    saved: int
    loss_transient: int
    checkpointed: int
    per_layer: int
    head: int
    weight_copies: int

    @property
    def total(self) -> int:
        """The peak without checkpointing: what is saved plus the loss's transient."""
        return self.saved + self.loss_transient


def activation_memory(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    precision: str,
    *,
    adapter_rank: int = 0,
) -> ActivationMemory:
    """Count the activation bytes of one step of ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        shape: The model (see :func:`~blockllm.app.planning.model_shapes.load_model_shape`).
        batch_size: Sequences per micro-batch.
        seq_len: Tokens per sequence.
        precision: One of :data:`PRECISIONS`.
        adapter_rank: LoRA's rank: each adapted linear layer also saves its ``rank``-wide
            intermediate (0: no adapters).

    Returns:
        The byte counts; every tensor is counted once, as storage.

    Raises:
        ValueError: an unknown precision, or a count below 1.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"Invalid precision: {precision!r} (choose from {', '.join(map(repr, PRECISIONS))})"
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"Invalid {name}: {value} (must be >= 1)")
    tokens = batch_size * seq_len
    autocast = precision == "bf16"
    act = _FP32 if precision == "fp32" else 2  # bytes of a matmul's output
    stream = 2 if precision == "bf16-pure" else _FP32  # the residual stream between layers
    # The loss's log-probabilities: autocast runs cross-entropy in fp32.
    log_prob = _FP32 if precision != "bf16-pure" else 2
    h, i = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim

    # An RMSNorm saves its input in fp32, 1/rms, and the normalised input (before the weight),
    # which stays fp32 unless the weights are bf16 (the norm casts back before the weight).
    norm = _FP32 * h + _FP32 + stream * h
    if autocast:
        # Every linear layer casts its input itself (autocast caches only leaf weights):
        # q, k, v after the first norm, gate and up after the second.
        linear_inputs = 5 * 2 * h
    else:
        linear_inputs = 2 * act * h  # one tensor shared by q/k/v, one by gate/up
    attention = act * (2 * q + 2 * kv) + _FP32 * shape.heads
    mlp = 4 * act * i
    adapters = 0
    if adapter_rank:
        linears = sum(
            1 for tensor in shape.layer_tensors(0) if tensor.linear and len(tensor.shape) == 2
        )
        adapters = linears * adapter_rank * act
    per_token_layer = 2 * norm + linear_inputs + attention + mlp + adapters
    head_input = 2 * h if autocast else act * h
    per_token_head = norm + head_input + log_prob * shape.vocab + 2 * _INDEX

    rotary = 2 * seq_len * shape.head_dim * stream  # cos and sin, shared by the batch and layers
    weight_copies = head_copies = layer_copies = 0
    if autocast:
        weight_copies = 2 * sum(tensor.numel for tensor in shape.tensors if tensor.linear)
        head_copies = 2 * sum(t.numel for t in shape.tensors if t.linear and t.layer is None)
        layer_copies = 2 * sum(tensor.numel for tensor in shape.layer_tensors(0) if tensor.linear)

    per_layer = tokens * per_token_layer
    head = tokens * per_token_head
    saved = shape.layers * per_layer + head + rotary + weight_copies
    loss_transient = 2 * tokens * shape.vocab * log_prob
    # At the end of the forward the logits are alive too, and autocast's fp32 copy of them while
    # the loss runs: less than the backward's two gradients, but before autocast's weight copies
    # are released (it caches them until the autocast region ends, before the backward).
    forward_extra = tokens * shape.vocab * (act + (_FP32 if autocast else 0))

    # Checkpointing: the layers' inputs stay; the backward first runs the loss and the head, then
    # recomputes one layer at a time. Which moment peaks depends on the sizes.
    stored = shape.layers * tokens * h * stream + tokens * _INDEX + rotary
    head_rest = head - tokens * _INDEX
    forward_end = head_rest + weight_copies + forward_extra
    backward_top = head_rest + head_copies + loss_transient
    # A recomputed layer's norm saves the stored input itself when the stream is fp32.
    recompute = per_layer + layer_copies - (tokens * h * _FP32 if stream == _FP32 else 0)
    checkpointed = stored + max(forward_end, backward_top, recompute)
    return ActivationMemory(
        saved=saved,
        loss_transient=loss_transient,
        checkpointed=checkpointed,
        per_layer=per_layer,
        head=head,
        weight_copies=weight_copies,
    )


__all__ = ["PRECISIONS", "ActivationMemory", "activation_memory"]
