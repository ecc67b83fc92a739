"""The budget-shaping options: per-tensor caps, row-wise partial tensors, entry warmup, and
compacted gradients of partly selected tensors."""

import pytest
import torch

from blockllm import BlockLLM
from tests.optim.helpers import TinyNet, loss_of, make_batches, snapshot


def run(steps=12, accumulate=1, clip=None, **kwargs):
    torch.manual_seed(0)
    model = TinyNet(vocab=64, width=16)
    settings = dict(lr=1e-2, sparsity=0.8, trigger="interval", patience=3, fused=False)
    settings.update(kwargs)
    optimizer = BlockLLM(model.named_parameters(), **settings)
    batches = make_batches(steps * accumulate, batch=8, vocab=64)
    grad_bytes = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulate):
            # Every backward but the last held: the step then uses the whole step's gradient.
            with optimizer.hold_gradients() if micro + 1 < accumulate else torch.enable_grad():
                loss = loss_of(model, batches[step * accumulate + micro]) / accumulate
                loss.backward()
            total += loss.item()
        if clip is not None:
            optimizer.clip_grad_norm_(clip)
        optimizer.step(loss=total)
        grad_bytes.append(optimizer.memory_report()["grads"])
    return model, optimizer, grad_bytes


@pytest.mark.parametrize("accumulate", [1, 3])
def test_compacted_gradients_train_exactly_like_dense_ones(accumulate):
    dense_model, dense_opt, dense_bytes = run(
        accumulate=accumulate, max_tensor_share=0.3, partial="rows", compact_grads=False
    )
    compact_model, compact_opt, compact_bytes = run(
        accumulate=accumulate, max_tensor_share=0.3, partial="rows", compact_grads=True
    )
    assert dense_opt.num_reselections == compact_opt.num_reselections >= 3
    # some selection had a partly selected tensor, or the test proves nothing
    assert any(b < a for a, b in zip(dense_bytes, compact_bytes))
    for name, value in snapshot(dense_model).items():
        torch.testing.assert_close(snapshot(compact_model)[name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("rest", ["none", "colnorm"])
def test_clip_grad_norm_sees_compacted_gradients(rest):
    # Not "sign": a sign step amplifies the last-bit difference of the two norms' summation
    # orders past this tolerance over 12 steps; colnorm is continuous and shows the same path.
    options = dict(max_tensor_share=0.3, partial="rows", clip=0.05, rest=rest, vocab_rest=None)
    dense_model, _, _ = run(compact_grads=False, **options)
    compact_model, _, _ = run(compact_grads=True, **options)
    for name, value in snapshot(dense_model).items():
        torch.testing.assert_close(snapshot(compact_model)[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_optimizer_clip_matches_torch_clip_when_every_tensor_is_whole():
    model = TinyNet(vocab=64, width=16)
    twin = TinyNet(vocab=64, width=16)
    twin.load_state_dict(model.state_dict())
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.0)
    batch = make_batches(1, vocab=64)[0]
    loss_of(model, batch).backward()
    loss_of(twin, batch).backward()
    before = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in twin.parameters()])))
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    total = optimizer.clip_grad_norm_(0.01, parameters=model.parameters())
    assert torch.equal(total, expected) and before > 0.01  # bitwise torch's norm; a real clip
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_a_cap_spreads_the_budget_over_several_tensors():
    model = TinyNet(vocab=512, width=16)  # the embedding alone is 8192 of 9125 coordinates
    capped = BlockLLM(model.named_parameters(), sparsity=0.9, max_tensor_share=0.25, partial="rows")
    loss_of(model, make_batches(1, vocab=512)[0]).backward()
    capped.step(loss=1.0)
    assert "embed.weight" in capped.selected
    assert capped.coordinates("embed.weight").numel() <= capped.budget // 4
    assert len(capped.selected) > 1
    assert capped.num_selected == capped.budget


def test_rows_mode_selects_whole_rows_of_the_embedding():
    model = TinyNet(vocab=512, width=16)
    tokens = torch.randint(0, 20, (8, 6))  # only 20 tokens occur: 20 rows carry gradient
    optimizer = BlockLLM(
        model.named_parameters(), sparsity=0.97, partial="rows", include=["embed.weight"],
    )  # fmt: skip
    torch.nn.functional.cross_entropy(model(tokens), tokens[:, 0] % 5).backward()
    optimizer.step(loss=1.0)
    picked = optimizer.coordinates("embed.weight").long()
    rows = picked // 16
    full_rows = [row for row in rows.unique().tolist() if int((rows == row).sum()) == 16]
    assert picked.numel() == optimizer.budget == 245  # 15 rows and 5 coordinates
    assert len(full_rows) == 15
    assert set(full_rows) <= set(range(20))
    assert set((picked // 16).tolist()) <= set(range(20))


def test_entry_warmup_scales_the_first_updates_of_a_reentering_block():
    def first_update(entry_warmup):
        torch.manual_seed(0)
        model = TinyNet()
        optimizer = BlockLLM(
            model.named_parameters(), lr=1e-2, sparsity=0.5, trigger="interval", patience=1,
            entry_warmup=entry_warmup, fused=False, rest="none",
        )  # fmt: skip  (rest="none": a tensor's change is then Adam's alone)
        changes = []
        for batch in make_batches(3):
            before = snapshot(model)
            optimizer.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            optimizer.step(loss=loss)
            changes.append({n: (p - before[n]).abs().max().item() for n, p in snapshot(model).items()})
        return changes

    plain, warmed = first_update(0), first_update(4)
    # the first selection is left to the learning-rate schedule; later entries start at lr / 4
    assert plain[0] == warmed[0]
    entered = [n for n, v in warmed[1].items() if v != plain[1][n]]
    assert entered
    for name in entered:
        assert warmed[1][name] == pytest.approx(plain[1][name] / 4, rel=1e-4)
    # blocks selected since the first step are not warmed up again
    assert any(v > 0 and v == plain[1][n] for n, v in warmed[1].items())
