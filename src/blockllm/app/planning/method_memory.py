"""What each training method holds on the device, by category, from a model's tensor sizes alone.

One function per ``--optimizer`` name (:data:`METHOD_MODELS`), each following the rules of the
method as this application runs it. Categories, all in bytes, each at its own peak in a step:

* ``weights``: every parameter (plus LoRA's adapters);
* ``gradients``: the most gradient memory held at once, ``gradient_transient`` of it being the one
  gradient that lands and is freed during the backward (BlockLLM), with ``rest_work`` of that: the
  full-size temporaries of the rest step taken with it on a GPU (:func:`rest_work_bytes`);
* ``optimizer_state``: Adam's two fp32 moments (8 bytes a coordinate; BlockLLM's in bf16 with
  ``moment_dtype="bfloat16"``: 4) and what else the method
  keeps (GaLore's projectors, 8-bit AdamW's block scales, BlockLLM's coordinate lists);
* ``master_weights``: fp32 copies of bf16 weights, for what the method updates (under
  ``bf16-pure``; BAdam keeps one of its active block in every precision);
* ``activations`` and ``activations_checkpointed``: see
  :mod:`blockllm.app.planning.activation_memory`.

Precisions: ``fp32`` (4-byte weights and gradients), ``bf16`` (autocast: fp32 weights and
gradients, bf16 activations), ``bf16-pure`` (2-byte weights and gradients, and for every method
fp32 moments and an fp32 master copy of each coordinate it updates: mixed-precision training as in
the README's table).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blockllm.app.planning.activation_memory import PRECISIONS, ActivationMemory, activation_memory
from blockllm.app.planning.model_shapes import ModelShape, TensorInfo
from blockllm.config import BlockLLMConfig
from blockllm.optim.adam_update import WIDENING_CHUNK
from blockllm.selection.candidates import VOCABULARY_NAMES, auto_pinned
from blockllm.selection.names import NameMatcher
from blockllm.selection.packing import budget_for
from blockllm.selection.rest_rules import rest_rules_for

MOMENTS = 8  # Adam's exp_avg and exp_avg_sq, fp32
_FP32 = 4
_INDEX32 = 4  # an int32 coordinate id


@dataclass(frozen=True)
class EstimateSettings:
    """What a step looks like: the batch, the precision, and BlockLLM's knobs.

    Attributes:
        batch_size: Sequences per micro-batch.
        seq_len: Tokens per sequence.
        precision: ``fp32``, ``bf16`` (autocast) or ``bf16-pure``.
        gradient_checkpointing: The totals use the checkpointed activations.
        sparsity: BlockLLM's sparsity; LISA's share of frozen layers.
        exclude: BlockLLM: names never selected (frozen), a regex.
        always_adam: BlockLLM: names trained with Adam whole at every step, a regex.
        moment_dtype: BlockLLM: the dtype of the block's Adam moments (its ``moment_dtype``).
        master_weights: BlockLLM: fp32 masters of the block under ``bf16-pure`` (its
            ``master_weights``).
    """

    batch_size: int
    seq_len: int
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    sparsity: float = 0.9
    exclude: str | None = None
    always_adam: str | None = None
    moment_dtype: str = "float32"
    master_weights: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"Invalid precision: {self.precision!r} (choose from "
                f"{', '.join(map(repr, PRECISIONS))})"
            )
        # BlockLLM's own checks (sparsity in [0, 1), valid regexes, dtypes), with its messages.
        BlockLLMConfig(
            sparsity=self.sparsity, exclude=self.exclude, always_adam=self.always_adam,
            moment_dtype=self.moment_dtype, master_weights=self.master_weights,
        )  # fmt: skip

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16-pure" else _FP32

    @property
    def master_bytes(self) -> int:
        """Bytes of the master copy of one updated coordinate."""
        return _FP32 if self.precision == "bf16-pure" else 0


@dataclass(frozen=True)
class MethodMemory:
    """Peak bytes of one method, by category (see the module docstring)."""

    method: str
    weights: int
    gradients: int
    optimizer_state: int
    master_weights: int
    activations: int
    activations_checkpointed: int
    gradient_transient: int = 0
    rest_work: int = 0
    notes: tuple[str, ...] = field(default=())

    def total(self, gradient_checkpointing: bool = False) -> int:
        """Every category at its peak, summed: an upper bound of the step's peak.

        Activations peak at the end of the forward and gradients at the end of the backward, so
        the real peak is lower by up to the smaller of the two.
        """
        activations = self.activations_checkpointed if gradient_checkpointing else self.activations
        return (
            self.weights + self.gradients + self.optimizer_state + self.master_weights + activations
        )


MethodModel = Callable[[ModelShape, EstimateSettings, ActivationMemory], MethodMemory]


def _common(
    method: str,
    shape: ModelShape,
    settings: EstimateSettings,
    activations: ActivationMemory,
    *,
    trained: int,
    state: int | None = None,
    weights: int | None = None,
    gradients: int | None = None,
    notes: tuple[str, ...] = (),
) -> MethodMemory:
    """A method that keeps Adam state, a gradient and (bf16-pure) a master for ``trained`` coordinates."""
    size = settings.weight_bytes
    return MethodMemory(
        method=method,
        weights=(shape.num_parameters if weights is None else weights) * size,
        gradients=(trained if gradients is None else gradients) * size,
        optimizer_state=MOMENTS * trained if state is None else state,
        master_weights=settings.master_bytes * trained,
        activations=activations.total,
        activations_checkpointed=activations.checkpointed,
        notes=notes,
    )


def adamw_memory(
    shape: ModelShape, settings: EstimateSettings, activations: ActivationMemory
) -> MethodMemory:
    """AdamW: a gradient, two moments (and a master) for every coordinate."""
    return _common("adamw", shape, settings, activations, trained=shape.num_parameters)


def blockllm_memory(
    shape: ModelShape,
    settings: EstimateSettings,
    activations: ActivationMemory,
    *,
    method: str = "blockllm",
    knobs: dict[str, object] | None = None,
) -> MethodMemory:
    """BlockLLM as the command line builds it (compacted gradients, row gradients).

    The budget is ``k = floor((1 - sparsity) * N)`` over the candidates' ``N`` coordinates
    (``exclude`` removes candidates, ``always_adam`` tensors take no budget). Held at once: the
    selected coordinates' gradients, moments and (bf16-pure) fp32 masters, the same for the
    ``always_adam`` tensors whole, and during the backward one more gradient, the largest
    candidate's: on a selection step every candidate's gradient lands and is scored, shortlisted
    or freed in its hook (with a ``rest`` rule also on every other step, stepped with and freed),
    so the selection plus one tensor is the most ever held. Row ids of partly selected tensors
    are negligible; single coordinates (``selection="mask"``, ``partial="coordinates"``) keep an
    int32 id each, counted here for all ``k`` (an upper bound).

    Raises:
        ValueError: the sparsity leaves no coordinate to train.
    """
    config = BlockLLMConfig(
        sparsity=settings.sparsity, exclude=settings.exclude, always_adam=settings.always_adam,
        moment_dtype=settings.moment_dtype, master_weights=settings.master_weights,
    ).replace(**(knobs or {}))  # fmt: skip
    excluded = NameMatcher("exclude", config.exclude)
    candidates = [t for t in shape.tensors if not excluded.matches([t.name])]
    is_pinned = _pinned_by(config.always_adam)
    pinned = sum(t.numel for t in candidates if is_pinned(t))
    total = sum(t.numel for t in candidates) - pinned
    budget = budget_for(config.sparsity, total)
    if budget < 1 and total > 0:
        raise ValueError(
            f"Invalid sparsity: {config.sparsity} leaves a budget of 0 of {total} coordinates"
        )
    largest = max((t.numel for t in candidates), default=0)
    held = budget + pinned
    if config.rest != "none" and not config.rest_in_backward:
        # The rest is stepped in step(): every candidate's gradient is held until then.
        held, largest = sum(t.numel for t in candidates), 0
    single = config.selection == "mask" or config.partial == "coordinates"
    size = settings.weight_bytes
    notes = [
        f"budget k = {budget:,} of {total:,} candidate coordinates (sparsity {config.sparsity:g})"
        + (f", plus {pinned:,} always_adam coordinates" if pinned else "")
    ]
    if single:
        notes.append("single coordinates: an int32 id each, counted for all k (an upper bound)")
    if config.rest != "none" and config.rest_in_backward:
        notes.append(
            f"rest={config.rest}: every gradient lands once and is freed in its hook; the held "
            "gradients stay the selection's"
        )
    elif config.rest != "none":
        notes.append(f"rest={config.rest} stepped in step(): every gradient is held until then")
    if settings.master_bytes and not config.master_weights:
        notes.append(
            "master_weights=False: no fp32 masters; step() widens the block to fp32 at most "
            f"{WIDENING_CHUNK:,} entries at a time (after the backward, not counted)"
        )
    stepped = [t for t in candidates if not is_pinned(t)]
    rule_state = _rest_rule_state(config, stepped)
    if rule_state:
        notes.append(f"the rest rule's own state (factored: row and column statistics): {rule_state:,} bytes")
    rest_work = rest_work_bytes(config, stepped, size) if config.rest != "none" else 0
    if rest_work:
        notes.append(
            f"the rest step's full-size temporaries on a GPU (its direction over the largest "
            f"matrix, written out whole): {rest_work:,} bytes, counted with the gradients"
        )
    return MethodMemory(
        method=method,
        weights=shape.num_parameters * size,
        gradients=held * size + largest * size + rest_work,
        gradient_transient=largest * size + rest_work,
        rest_work=rest_work,
        optimizer_state=(
            # Two moments in moment_dtype ("float32" is the update's dtype: fp32 in every precision).
            2 * getattr(torch, config.moment_dtype).itemsize * (budget + pinned)
            + (_INDEX32 * budget if single else 0)
            + rule_state
        ),
        master_weights=settings.master_bytes * (budget + pinned) if config.master_weights else 0,
        activations=activations.total,
        activations_checkpointed=activations.checkpointed,
        notes=tuple(notes),
    )


def _pinned_by(always_adam: str | None) -> Callable[[TensorInfo], bool]:
    """Whether ``always_adam`` pins a tensor, as the optimizer decides it: ``"auto"`` pins
    vectors and the vocabulary matrices, anything else is a name pattern."""
    if always_adam == "auto":
        return lambda tensor: auto_pinned([tensor.name], len(tensor.shape))
    matcher = NameMatcher("always_adam", always_adam)
    return lambda tensor: matcher.matches([tensor.name])


# Full-size temporaries per entry of a rest step on a GPU, beside the gradient itself, by rule
# and weight size in bytes (fp32 or autocast: 4; bf16-pure: 2), read off the path a GPU takes
# in ``RestStepper._step`` (the final write to the weight runs in 1M-entry slices, left out):
# * a rule with ``prepare`` (factored): none; a matrix is stepped in place, a 4M-entry slice at
#   a time, as on a CPU (until 0.6.3 a GPU wrote its fp32 direction whole: 4); another rule not
#   listed here (a user's) writes its direction whole, counted as fp32 (4);
# * sign: none in fp32 (the sign is taken in place on the gradient, which is freed next); a bf16
#   sign (2) widened to the fp32 step (4);
# * colnorm: the square of the rows for their RMS, then the direction (4 each, not at once); in
#   bf16 the widened gradient (4) beside them, the direction rounded to bf16 (2).
_REST_WORK_PER_ENTRY = {
    ("SignRest", 4): 0, ("SignRest", 2): 6,
    ("ColumnNormRest", 4): 4, ("ColumnNormRest", 2): 10,
}  # fmt: skip


def rest_work_bytes(config: BlockLLMConfig, stepped: list[TensorInfo], size: int) -> int:
    """The most bytes a rest step allocates on a GPU besides the gradient, over the tensors it
    steps (the rules the optimizer builds; vectors counted alike, they are never the largest).
    Weight decay is left out (0 in the command line's default; with it the sign rule takes the
    general path too, 4 bytes an entry in fp32). A user's rule without ``prepare`` has its
    direction written out whole, counted as fp32 (4 bytes an entry)."""
    rule, vocab_rule = rest_rules_for(config.rest, config.vocab_rest, config.factored_beta2)
    most = 0
    for tensor in stepped:
        vocabulary = VOCABULARY_NAMES.fullmatch(tensor.name) is not None
        applied = vocab_rule if vocabulary and vocab_rule is not None else rule
        if applied is None:
            continue
        kind = type(applied).__name__
        per_entry = _REST_WORK_PER_ENTRY.get((kind, size), 0 if hasattr(applied, "prepare") else 4)
        most = max(most, tensor.numel * per_entry)
    return most


def _rest_rule_state(config: BlockLLMConfig, stepped: list[TensorInfo]) -> int:
    """Bytes of the rest rule's own state over the tensors the rest step moves (the factored
    rule's row and column statistics), from the rules the optimizer builds
    (:func:`~blockllm.selection.rest_rules.rest_rules_for`, one process) and their
    ``init_state`` on meta tensors: what they allocate, without allocating it. Step counters
    are 0-d, left out like Adam's."""
    rule, vocab_rule = rest_rules_for(config.rest, config.vocab_rest, config.factored_beta2)
    total = 0
    for tensor in stepped:
        vocabulary = VOCABULARY_NAMES.fullmatch(tensor.name) is not None
        applied = vocab_rule if vocabulary and vocab_rule is not None else rule
        init = getattr(applied, "init_state", None)
        if init is None:
            continue
        state = init(torch.empty(tensor.shape, device="meta"))
        total += sum(value.numel() * value.element_size() for key, value in state.items() if key != "step")
    return total


def adamw8bit_memory(
    shape: ModelShape, settings: EstimateSettings, activations: ActivationMemory
) -> MethodMemory:
    """bitsandbytes' ``AdamW8bit`` with its defaults.

    Tensors of at least ``min_8bit_size = 4096`` coordinates keep two uint8 moments plus one fp32
    scale per moment and 256-coordinate block; smaller ones keep fp32 moments.
    """
    state = 0
    for tensor in shape.tensors:
        if tensor.numel >= 4096:
            state += 2 * tensor.numel + 2 * _FP32 * math.ceil(tensor.numel / 256)
        else:
            state += MOMENTS * tensor.numel
    return _common(
        "adamw-8bit", shape, settings, activations, trained=shape.num_parameters, state=state,
        notes=("bitsandbytes defaults: 8-bit block-wise moments for tensors of 4096+ coordinates",),
    )  # fmt: skip


def galore_memory(
    shape: ModelShape, settings: EstimateSettings, activations: ActivationMemory
) -> MethodMemory:
    """GaLore as ``blockllm.app.methods.galore`` sets it up.

    The attention and MLP matrices get Adam on their gradient projected to rank ``r`` (a quarter
    of the smallest such matrix's smaller side): moments of ``r * max(m, n)`` coordinates and a
    projector of ``r * min(m, n)`` in the weights' dtype; every other tensor plain Adam. The
    full-rank gradients are computed and held until ``step()``.
    """
    projected = [t for t in shape.tensors if _galore_projects(t)]
    regular = sum(t.numel for t in shape.tensors if not _galore_projects(t))
    rank = max(1, min(min(t.shape) for t in projected) // 4) if projected else 1
    state = MOMENTS * regular
    for tensor in projected:
        rows, cols = tensor.shape
        state += MOMENTS * rank * max(rows, cols) + settings.weight_bytes * rank * min(rows, cols)
    return _common(
        "galore", shape, settings, activations, trained=shape.num_parameters, state=state,
        notes=(f"rank {rank} on {len(projected)} attention/MLP matrices; step()'s full-rank "
               "update of one matrix is a temporary not counted",),
    )  # fmt: skip


def _galore_projects(tensor: TensorInfo) -> bool:
    # The rule of blockllm.app.methods.galore.build: 2-D attention and MLP weights.
    return len(tensor.shape) == 2 and any(
        key in tensor.name for key in ("attn", "mlp", "attention")
    )


def lora_memory(
    shape: ModelShape, settings: EstimateSettings, activations: ActivationMemory
) -> MethodMemory:
    """LoRA as ``blockllm.app.methods.lora`` pretrains: rank-16 adapters on every linear layer but
    the head, with the embedding, the norms and the head trained in full.
    """
    from blockllm.app.methods.lora import RANK

    adapted = [t for t in shape.tensors if t.linear and t.layer is not None]
    adapters = sum(RANK * sum(t.shape) for t in adapted if len(t.shape) == 2)
    trained = adapters + shape.num_parameters - sum(t.numel for t in adapted)
    with_adapters = activation_memory(
        shape, settings.batch_size, settings.seq_len, settings.precision, adapter_rank=RANK
    )
    return _common(
        "lora", shape, settings, with_adapters, trained=trained,
        weights=shape.num_parameters + adapters,
        notes=(f"rank {RANK}; finetuning (adapters and a classifier only) holds less",),
    )  # fmt: skip


def badam_memory(
    shape: ModelShape, settings: EstimateSettings, activations: ActivationMemory
) -> MethodMemory:
    """BAdam: one block trained at a time (a decoder layer, the embedding, or the head with the
    other loose tensors), with an fp32 copy of it in every precision; the worst block counts.
    """
    blocks: dict[str, int] = {}
    for tensor in shape.tensors:
        if tensor.layer is not None:
            key = f"layer {tensor.layer}"
        elif tensor.embedding:
            key = "embedding"
        else:
            key = "head"
        blocks[key] = blocks.get(key, 0) + tensor.numel
    worst, size = max(blocks.items(), key=lambda item: item[1])
    memory = _common(
        "badam", shape, settings, activations, trained=size,
        notes=(f"the largest block ({worst}); activations as AdamW's (a step whose backward "
               "reaches the embedding)",),
    )  # fmt: skip
    return dataclasses.replace(memory, master_weights=_FP32 * size)


def lisa_memory(
    shape: ModelShape, settings: EstimateSettings, activations: ActivationMemory
) -> MethodMemory:
    """LISA: the embedding, final norm and head always trained, plus ``ceil((1 - sparsity) *
    layers)`` decoder layers (the largest ones count).
    """
    sizes: dict[int, int] = {}
    outside = 0
    for tensor in shape.tensors:
        if tensor.layer is None:
            outside += tensor.numel
        else:
            sizes[tensor.layer] = sizes.get(tensor.layer, 0) + tensor.numel
    active = max(1, math.ceil((1.0 - settings.sparsity) * len(sizes))) if sizes else 0
    trained = outside + sum(sorted(sizes.values(), reverse=True)[:active])
    return _common(
        "lisa", shape, settings, activations, trained=trained,
        notes=(f"{active} of {len(sizes)} layers active; activations as AdamW's (an upper "
               "bound: frozen layers save no linear inputs)",),
    )  # fmt: skip


#: The method models by ``--optimizer`` name (BlockLLM's variants are found through
#: :func:`blockllm.app.methods.blockllm_variants.blockllm_knobs`).
METHOD_MODELS: dict[str, MethodModel] = {
    "adamw": adamw_memory,
    "adamw-8bit": adamw8bit_memory,
    "galore": galore_memory,
    "lora": lora_memory,
    "badam": badam_memory,
    "lisa": lisa_memory,
}


__all__ = [
    "METHOD_MODELS",
    "MOMENTS",
    "EstimateSettings",
    "MethodMemory",
    "MethodModel",
    "adamw8bit_memory",
    "adamw_memory",
    "badam_memory",
    "blockllm_memory",
    "galore_memory",
    "lisa_memory",
    "lora_memory",
]
