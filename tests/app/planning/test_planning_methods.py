"""Each method's categories by its rules, on shapes small enough to check by hand; the 8B config."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import transformers

from blockllm.app.planning import EstimateSettings, estimate_memory, load_model_shape
from blockllm.app.planning.memory_plan import default_methods, format_plan
from blockllm.app.planning.method_memory import blockllm_memory
from blockllm.selection.rest_rules import ColumnNormRest

LLAMA_8B = Path(__file__).parent / "data" / "llama-8b-config.json"


def factored_bytes(tensors) -> int:
    """fp32 per row and per column of each matrix, per entry of each vector."""
    return sum(4 * (t.numel // t.shape[-1] + t.shape[-1]) if len(t.shape) >= 2 else 4 * t.numel
               for t in tensors)


def rows(shape, methods, **settings):
    plan = estimate_memory(shape, EstimateSettings(batch_size=2, seq_len=16, **settings), methods)
    return plan, {row.method: row for row in plan.rows}


def test_shape_lists_every_tensor_once(shape):
    h, i, v, kv = 64, 176, 1000, 32
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert shape.num_parameters == 2 * v * h + 4 * layer + h
    assert [t.layer for t in shape.tensors].count(None) == 3  # embedding, final norm, head
    assert sum(t.linear for t in shape.tensors) == 4 * 7 + 1


def test_adamw_holds_everything_per_coordinate(shape):
    n = shape.num_parameters
    _, by = rows(shape, ["adamw"])
    assert (by["adamw"].weights, by["adamw"].gradients, by["adamw"].optimizer_state) == (
        4 * n,
        4 * n,
        8 * n,
    )
    _, pure = rows(shape, ["adamw"], precision="bf16-pure")
    assert (pure["adamw"].weights, pure["adamw"].gradients, pure["adamw"].master_weights) == (
        2 * n,
        2 * n,
        4 * n,
    )


def test_blockllm_follows_its_budget(shape):
    n = shape.num_parameters
    largest = max(t.numel for t in shape.tensors)
    k = math.floor(0.1 * n + 1e-9)
    _, by = rows(shape, ["blockllm", "blockllm-0.95"], precision="bf16-pure")
    row = by["blockllm"]
    assert row.weights == 2 * n
    # The largest candidate's gradient lands; its factored rest step is taken in place, on a
    # GPU too (slices only: no full-size direction beside it).
    assert row.rest_work == 0
    assert (row.gradients, row.gradient_transient) == (2 * (k + largest), 2 * largest)
    # Adam's moments for the block, and the default rest rule's (factored) statistics.
    rule = factored_bytes(shape.tensors)
    assert (row.optimizer_state, row.master_weights) == (8 * k + rule, 4 * k)
    assert by["blockllm-0.95"].optimizer_state == 8 * math.floor(0.05 * n + 1e-9) + rule


def test_blockllm_bf16_moments_take_half_the_state(shape):
    k = math.floor(0.2 * shape.num_parameters + 1e-9)
    for precision in ("fp32", "bf16-pure"):
        _, by = rows(shape, ["blockllm", "blockllm-mask"], precision=precision, sparsity=0.8,
                     moment_dtype="bfloat16")  # fmt: skip
        rule = factored_bytes(shape.tensors)
        assert by["blockllm"].optimizer_state == 4 * k + rule
        assert by["blockllm-mask"].optimizer_state == 4 * k + 4 * k + rule  # plus the int32 ids
    with pytest.raises(ValueError, match=r"Invalid moment_dtype: 'float16' \(choose from"):
        rows(shape, ["blockllm"], moment_dtype="float16")


def test_blockllm_exclude_and_always_adam(shape):
    embed = 1000 * 64
    n = shape.num_parameters
    _, by = rows(shape, ["blockllm"], exclude=r".*embed_tokens\.weight",
                 always_adam=r".*norm\.weight")  # fmt: skip
    norms = sum(t.numel for t in shape.tensors if t.name.endswith("norm.weight"))
    k = math.floor(0.1 * (n - embed - norms) + 1e-9)
    row = by["blockllm"]
    stepped = [t for t in shape.tensors
               if not t.name.endswith(("embed_tokens.weight", "norm.weight"))]  # fmt: skip
    assert row.optimizer_state == 8 * (k + norms) + factored_bytes(stepped)
    # The head, now the largest candidate: its gradient (stepped in place).
    assert (row.gradient_transient, row.rest_work) == (4 * 1000 * 64, 0)
    assert any("always_adam" in note for note in row.notes)


def test_always_adam_auto_pins_what_the_optimizer_pins(shape, micro_config):
    # "auto" is no name pattern: it pins the vectors and the vocabulary matrices, as the
    # optimizer built on the same model does (0.6.2's estimate read it as a regex, pinning none).
    from blockllm import BlockLLM

    model = transformers.LlamaForCausalLM(micro_config)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, always_adam="auto")
    params = dict(model.named_parameters())
    candidates = optimizer._candidates
    pinned_by_optimizer = sum(params[candidates.names[i]].numel() for i in candidates.pinned)
    expected = sum(t.numel for t in shape.tensors
                   if len(t.shape) == 1 or t.name.endswith(("embed_tokens.weight", "lm_head.weight")))  # fmt: skip
    assert pinned_by_optimizer == expected > 2 * 1000 * 64
    _, by = rows(shape, ["blockllm"], always_adam="auto")
    n = shape.num_parameters
    k = math.floor(0.1 * (n - expected) + 1e-9)
    stepped = [t for t in shape.tensors
               if len(t.shape) == 2 and not t.name.endswith(("embed_tokens.weight", "lm_head.weight"))]  # fmt: skip
    assert by["blockllm"].optimizer_state == 8 * (k + expected) + factored_bytes(stepped)
    assert f"plus {expected:,} always_adam coordinates" in by["blockllm"].notes[0]


def test_rest_rules(shape):
    plan, by = rows(shape, ["blockllm"])
    in_backward = blockllm_memory(shape, plan.settings, plan.activations, knobs={"rest": "sign"})
    assert in_backward.gradients == by["blockllm"].gradients  # freed in the hooks
    # The default (auto = factored) keeps row and column statistics for every candidate; sign
    # keeps them for the embedding and head only (vocab_rest auto), 'none' for nothing.
    vocabulary = [t for t in shape.tensors if t.name.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(vocabulary) == 2
    frozen = blockllm_memory(shape, plan.settings, plan.activations, knobs={"rest": "none"})
    assert by["blockllm"].optimizer_state - frozen.optimizer_state == factored_bytes(shape.tensors)
    assert in_backward.optimizer_state - frozen.optimizer_state == factored_bytes(vocabulary)
    sign_only = blockllm_memory(
        shape, plan.settings, plan.activations, knobs={"rest": "sign", "vocab_rest": None}
    )
    assert sign_only.optimizer_state == frozen.optimizer_state
    in_step = blockllm_memory(
        shape, plan.settings, plan.activations, knobs={"rest": "sign", "rest_in_backward": False}
    )
    # Every gradient held until step(); there the vocabulary matrices (factored by
    # vocab_rest="auto") are stepped in place and the others by sign, in place on fp32.
    assert (in_step.gradients, in_step.gradient_transient, in_step.rest_work) == (
        4 * shape.num_parameters, 0, 0
    )
    # A user's rule without `prepare` has its direction written out whole, in fp32.
    user = blockllm_memory(shape, plan.settings, plan.activations, knobs={"rest": ColumnNormRest(), "vocab_rest": None})
    assert user.rest_work == 4 * max(t.numel for t in shape.tensors)
    # Sign everywhere: taken in place on an fp32 gradient; a bf16 sign widened to fp32.
    assert sign_only.rest_work == 0
    largest = max(t.numel for t in shape.tensors)
    plan_bf16, _ = rows(shape, ["blockllm"], precision="bf16-pure")
    knobs = {"rest": "sign", "vocab_rest": None}
    assert blockllm_memory(shape, plan_bf16.settings, plan_bf16.activations, knobs=knobs).rest_work == 6 * largest
    assert frozen.rest_work == 0


def test_mask_selection_counts_coordinate_ids(shape):
    _, by = rows(shape, ["blockllm", "blockllm-mask"])
    k = math.floor(0.1 * shape.num_parameters + 1e-9)
    assert by["blockllm-mask"].optimizer_state - by["blockllm"].optimizer_state == 4 * k


def test_peers(shape):
    n, h, v = shape.num_parameters, 64, 1000
    _, by = rows(shape, ["adamw-8bit", "galore", "lora", "badam", "lisa"])
    big = [t.numel for t in shape.tensors if t.numel >= 4096]
    small = n - sum(big)
    assert (
        by["adamw-8bit"].optimizer_state
        == sum(2 * x + 8 * math.ceil(x / 256) for x in big) + 8 * small
    )
    # GaLore: rank = 32 // 4 (k/v are 32 x 64); moments r * max side, projector r * min side.
    matrices = [t.shape for t in shape.tensors if t.layer is not None and len(t.shape) == 2]
    projected = sum(8 * 8 * max(s) + 4 * 8 * min(s) for s in matrices)
    assert by["galore"].optimizer_state == projected + 8 * (n - sum(a * b for a, b in matrices))
    adapters = sum(16 * (a + b) for a, b in matrices)
    trained = adapters + n - sum(a * b for a, b in matrices)
    assert by["lora"].weights == 4 * (n + adapters)
    assert by["lora"].optimizer_state == 8 * trained
    assert by["lora"].activations > by["galore"].activations  # the adapters' intermediates
    head = v * h + h  # the head block holds the final norm too
    assert (by["badam"].optimizer_state, by["badam"].master_weights) == (8 * head, 4 * head)
    layer = (n - 2 * v * h - h) // 4
    assert by["lisa"].optimizer_state == 8 * (2 * v * h + h + layer)  # 1 of 4 layers at s 0.9


def test_default_methods_and_skips(shape):
    assert default_methods()[:2] == ["adamw", "blockllm"]
    assert {"adamw-8bit", "galore", "lora", "badam", "lisa"} <= set(default_methods())
    plan, by = rows(shape, ["blockllm"])
    assert plan.baseline.method == "adamw" and "adamw" not in by  # the ratio's reference
    with pytest.raises(ValueError, match="Invalid optimizer: 'nope'"):
        rows(shape, ["nope"])


def test_checkpointing_changes_only_the_totals_activations(shape):
    plan, by = rows(shape, ["adamw"], gradient_checkpointing=True)
    row = by["adamw"]
    assert row.activations_checkpointed < row.activations
    assert plan.total(row) == row.total(False) - row.activations + row.activations_checkpointed


def test_the_8b_config_is_read_in_seconds_without_weights():
    started = time.perf_counter()
    shape = load_model_shape(str(LLAMA_8B))
    plan = estimate_memory(shape, EstimateSettings(batch_size=1, seq_len=4096,
                                                   precision="bf16-pure"))  # fmt: skip
    assert time.perf_counter() - started < 30
    assert shape.num_parameters == 8_030_261_248
    assert (shape.kv_heads, shape.head_dim, shape.vocab) == (8, 128, 128_256)
    text = format_plan(plan)
    assert "blockllm" in text and "vs AdamW" in text
    assert json.loads(json.dumps(plan.to_dict()))["model"]["num_parameters"] == 8_030_261_248


@pytest.mark.parametrize("model", ["nope", "missing/config.json"])
def test_unknown_model(model):
    with pytest.raises(ValueError, match="Invalid model"):
        load_model_shape(model)
