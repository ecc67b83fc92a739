"""RowGradients: partly selected vocabulary matrices get only their selected rows' gradient,
and training is the same as with autograd's dense gradients."""

import pytest
import torch
from torch import nn

from blockllm import BlockLLM
from blockllm.optim.row_gradients import RowGradients
from tests.optim.test_llama import patterned_batches, tiny_llama


def train(row_gradients, steps=14, accumulate=1, clip=None, tied=False, sparsity=0.9):
    model = tiny_llama()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    optimizer = BlockLLM(
        model.named_parameters(), lr=3e-3, sparsity=sparsity, trigger="interval", patience=4,
        compact_grads=True, fused=False, rest="none",
    )  # fmt: skip  (row gradients serve the frozen rule; a rest rule needs every row)
    patched = RowGradients(model, optimizer).patched if row_gradients else []
    batches = list(patterned_batches(steps * accumulate))
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            tokens = batches[step * accumulate + micro]
            (model(input_ids=tokens, labels=tokens).loss / accumulate).backward()
        if clip is not None:
            optimizer.clip_grad_norm_(clip)
        optimizer.step(loss=1.0)
        history.append(sorted(optimizer.selected))
    return model, optimizer, patched, history


@pytest.mark.parametrize(
    "options",
    [{}, {"accumulate": 3}, {"clip": 0.5}, {"tied": True}],
    ids=["plain", "accumulation", "clipping", "tied"],
)
def test_row_gradients_train_like_dense_gradients(options):
    dense_model, dense_opt, _, dense_history = train(False, **options)
    row_model, row_opt, patched, row_history = train(True, **options)
    assert "lm_head" in patched and "model.embed_tokens" in patched
    assert row_history == dense_history
    assert row_opt.num_reselections == dense_opt.num_reselections >= 3
    # The row products sum in another order than the full ones; over 14 Adam steps (clipped ones
    # amplify it most) that rounding grows to ~6e-5 at most, against updates of lr = 3e-3 per
    # step: a wrong row or coordinate would be off by whole updates.
    pairs = zip(dense_model.named_parameters(), row_model.named_parameters())
    for (name, dense), (_, rows) in pairs:
        assert (rows - dense).abs().max() < 2e-4, name
        assert (rows - dense).norm() < 1e-4 * dense.norm(), name


def after_a_selection_with_row_gradients(steps):
    """A patched tiny Llama after its selection step, its optimizer, and ``steps - 1`` batches."""
    model = tiny_llama()
    optimizer = BlockLLM(
        model.named_parameters(), lr=1e-3, sparsity=0.97, trigger="interval", patience=50,
        compact_grads=True, fused=False, rest="none",
    )  # fmt: skip
    RowGradients(model, optimizer)
    batches = patterned_batches(steps)
    tokens = next(batches)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step(loss=1.0)  # the selection step
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, batches


def test_ordinary_steps_build_no_dense_vocabulary_gradient():
    model, optimizer, batches = after_a_selection_with_row_gradients(2)
    head = model.lm_head.weight
    assert optimizer.coordinates("lm_head.weight") is not None  # partly selected
    tokens = next(batches)
    dense = []  # gradients autograd accumulated into .grad (compact_grads would gather them)
    store = optimizer.compact_gradients
    capture = store.capture
    store.capture = lambda i, p, c: (dense.append((i, p.grad is not None)), capture(i, p, c))
    model(input_ids=tokens, labels=tokens).loss.backward()
    vocabulary = {
        optimizer.candidate_names.index(n) for n in ("lm_head.weight", "model.embed_tokens.weight")
    }
    assert head.grad is None and not any(built for i, built in dense if i in vocabulary)
    # The compacted gradients are the selected coordinates of autograd's dense ones.
    reference = tiny_llama()
    reference.load_state_dict(model.state_dict())
    reference(input_ids=tokens, labels=tokens).loss.backward()
    for name, expected in (
        ("lm_head.weight", reference.lm_head.weight.grad),
        ("model.embed_tokens.weight", reference.model.embed_tokens.weight.grad),
    ):
        index = optimizer.candidate_names.index(name)
        coordinates = optimizer.coordinates(name).long()
        torch.testing.assert_close(
            optimizer.compact_gradients.held[index], expected.reshape(-1)[coordinates], rtol=1e-5, atol=1e-7
        )


def test_row_gradients_patch_nothing_under_a_rest_rule():
    # The rest step uses every unselected row's gradient: autograd's whole product is needed.
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.9, compact_grads=True, rest="sign")
    assert RowGradients(model, optimizer).patched == []
    assert type(model.lm_head) is nn.Linear


def test_row_gradients_need_compact_grads_and_leave_eval_alone():
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.9, compact_grads=False)
    with pytest.raises(ValueError, match="RowGradients needs an optimizer with compact_grads=True"):
        RowGradients(model, optimizer)
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.9, compact_grads=True, rest="none")
    tokens = next(patterned_batches(1))
    before = model(input_ids=tokens).logits.detach()
    RowGradients(model, optimizer)
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert torch.equal(before, after)


def test_only_plain_linear_and_embedding_modules_are_patched():
    class Scaled(nn.Embedding):
        def forward(self, indices):
            return super().forward(indices) * 2.0

    model = nn.Sequential(Scaled(10, 4), nn.Linear(4, 10), nn.Embedding(10, 4, max_norm=1.0))
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.5, compact_grads=True, rest="none")
    assert RowGradients(model, optimizer).patched == ["1"]


def test_row_gradients_with_bias_under_bf16_autocast():
    def run(row_gradients):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64))
        optimizer = BlockLLM(
            model.named_parameters(), lr=1e-2, sparsity=0.8, trigger="interval", patience=3,
            compact_grads=True, fused=False, rest="none",
        )  # fmt: skip
        if row_gradients:
            assert RowGradients(model, optimizer).patched == ["0", "1"]
        generator = torch.Generator().manual_seed(1)
        partial_steps = 0
        for _ in range(8):
            tokens = torch.randint(0, 64, (8, 12), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, 64), tokens.reshape(-1)
            )
            loss.backward()
            optimizer.step(loss=loss)
            optimizer.zero_grad(set_to_none=True)
            partial_steps += optimizer.coordinates("1.weight") is not None
        assert partial_steps > 0
        return model

    dense, rows = run(False), run(True)
    for (name, a), (_, b) in zip(dense.named_parameters(), rows.named_parameters()):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max() < 1e-3, name


def test_a_deep_copy_of_a_patched_model_gets_ordinary_gradients():
    import copy

    from blockllm.optim.row_gradients import unpatch_module

    model = tiny_llama()
    optimizer = BlockLLM(
        model.named_parameters(), sparsity=0.97, trigger="interval", patience=50,
        compact_grads=True, rest="none",
    )  # fmt: skip
    RowGradients(model, optimizer)
    tokens = next(patterned_batches(1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step(loss=1.0)
    optimizer.zero_grad(set_to_none=True)
    copied = copy.deepcopy(model)  # e.g. an EMA or a Trainer's copy
    copied.requires_grad_(True)
    copied(input_ids=tokens, labels=tokens).loss.backward()
    # The copy's weights are not the optimizer's: autograd's dense gradients, nothing deposited.
    assert copied.lm_head.weight.grad is not None and not optimizer.compact_gradients.held
    unpatch_module(model.lm_head)
    assert type(model.lm_head) is nn.Linear and "_blockllm_sink" not in vars(model.lm_head)


def test_a_users_tensor_hook_still_sees_the_weights_gradient():
    model, optimizer, batches = after_a_selection_with_row_gradients(3)
    assert optimizer.coordinates("lm_head.weight") is not None  # partly selected: rows patched
    seen = []
    handle = model.lm_head.weight.register_hook(lambda grad: seen.append(grad))
    tokens = next(batches)
    model(input_ids=tokens, labels=tokens).loss.backward()
    handle.remove()
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == model.lm_head.weight.shape
    optimizer.step(loss=1.0)  # and training goes on with the hook removed
    optimizer.zero_grad(set_to_none=True)
    tokens = next(batches)
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert model.lm_head.weight.grad is None  # the row product again: no dense gradient
