"""Memory stays flat, accumulation equals the large batch, low precision and bad numbers."""

import copy
import gc
import logging

import pytest
import torch

from blockllm import BlockLLM
from blockllm.optim import adam_update
from tests.optim.helpers import TinyNet, loss_of, make_batches, snapshot


@pytest.mark.parametrize(
    ("compact_grads", "dtype"),
    [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)],
)
def test_state_and_gradient_bytes_flat_over_200_reselections(compact_grads, dtype):
    # bf16 weights: fp32 masters of the block, created and dropped at every reselection.
    model = TinyNet(vocab=64, width=32, depth=4).to(dtype)
    opt = BlockLLM(
        model.named_parameters(), sparsity=0.9, trigger="interval", patience=1,
        compact_grads=compact_grads,
    )  # fmt: skip
    batches = make_batches(4, vocab=64)
    state_bytes, grad_bytes, master_bytes, hook_counts, objects = [], [], [], [], []
    for step in range(201):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, batches[step % 4])
        loss.backward()
        opt.step(loss=loss)
        report = opt.memory_report()
        state_bytes.append(report["optimizer_state"])
        grad_bytes.append(report["grads"])
        master_bytes.append(report["master_weights"])
        if step % 50 == 0:
            gc.collect()
            objects.append(len(gc.get_objects()))
            hook_counts.append(sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()))
    assert opt.num_reselections == 200
    # Adam state of about k coordinates (two fp32 moments), plus steps and coordinate lists
    bound = opt.budget * 4 * 2 + opt.budget * 8 + 64 * 20
    assert max(state_bytes) <= bound
    assert max(master_bytes) <= (opt.budget * 4 if dtype == torch.bfloat16 else 0)
    assert (min(master_bytes) > 0) == (dtype == torch.bfloat16)
    if compact_grads:
        # only the selected coordinates' gradients outlive the step
        assert max(grad_bytes) <= opt.budget * dtype.itemsize
    else:
        # plus the dense gradients of the partly selected tensors: at most one per budget share
        # (max_tensor_share 0.25) and the one that did not fit
        largest = max(p.numel() * 4 for p in model.parameters())
        assert max(grad_bytes) <= 5 * largest + opt.budget * 4
    assert len(set(hook_counts)) == 1 and hook_counts[0] == len(list(model.parameters()))
    assert max(objects) - min(objects) < 500  # no growth in Python objects


def test_gradient_accumulation_equals_the_large_batch():
    def run(micro_batches: int):
        torch.manual_seed(0)
        model = TinyNet(width=24)
        # Random scores make the ranking independent of which micro-batch it is computed on
        # (grad_norm ranks on the first backward of a selection step); everything else, the
        # coordinates of the partly selected tensor and every update, must use the whole
        # accumulated gradient to match the large batch.
        opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, trigger="interval",
                       patience=3, score="random", fused=False, foreach=False)  # fmt: skip
        for tokens, labels in make_batches(10, batch=16):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for part in range(micro_batches):
                rows = slice(part * 16 // micro_batches, (part + 1) * 16 // micro_batches)
                # Every backward but the last held: the step uses the whole step's gradient.
                more = part + 1 < micro_batches
                with opt.hold_gradients() if more else torch.enable_grad():
                    loss = loss_of(model, (tokens[rows], labels[rows])) / micro_batches
                    loss.backward()
                total += loss.item()
            opt.step(loss=total)
        return model, opt

    big, big_opt = run(1)
    small, small_opt = run(4)
    assert big_opt.num_reselections == small_opt.num_reselections == 3
    assert big_opt.selected == small_opt.selected
    partial = [n for n in big_opt.selected if big_opt.coordinates(n) is not None]
    for name in partial:
        assert torch.equal(big_opt.coordinates(name), small_opt.coordinates(name))
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_model_trains_with_fp32_master_weights_for_selected_blocks_only():
    model = TinyNet(width=32).to(torch.bfloat16)
    opt = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.8, trigger="interval", patience=5)
    batches = make_batches(60)
    losses = []
    for tokens, labels in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens).float(), labels)
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
        for name, param in model.named_parameters():
            state = opt.state.get(param) or {}
            if name in opt.selected:
                master = state["master"]
                assert master.dtype == state["exp_avg"].dtype == torch.float32
                if opt.coordinates(name) is None:
                    assert torch.equal(master.to(torch.bfloat16), param.detach())
            else:
                assert not state
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1
    assert opt.memory_report()["master_weights"] > 0


def test_bf16_gradients_are_widened_a_bounded_slice_of_the_block_at_a_time(monkeypatch):
    params = [torch.zeros(n) for n in (5, 3, 9, 2, 4)]
    grads = [torch.zeros(5, dtype=torch.bfloat16), torch.zeros(3), *(
        torch.zeros(n, dtype=torch.bfloat16) for n in (9, 2, 4))]
    # 9 alone is over the limit: a range of its own; the fp32 gradient costs nothing to pass.
    assert adam_update.widening_chunks(params, grads, limit=8) == [(0, 2), (2, 3), (3, 5)]
    assert adam_update.widening_chunks(params, grads, limit=100) == [(0, 5)]
    assert adam_update.widening_chunks(params[:1], [torch.zeros(5)], limit=1) == [(0, 1)]
    assert adam_update.widening_chunks([], [], limit=1) == []

    # Training is bit for bit the same whatever the slices, and no slice is wider than the limit.
    def train(limit):
        torch.manual_seed(0)
        model = TinyNet(width=32).to(torch.bfloat16)
        opt = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.5, trigger="interval",
                       patience=4, rest="none")
        widest = []
        real_chunks = adam_update.widening_chunks

        def chunks(params, grads, limit=limit):
            ranges = real_chunks(params, grads, limit)
            for start, stop in ranges:
                widest.append(sum(g.numel() for g in grads[start:stop]) if stop - start > 1 else 0)
            return ranges

        monkeypatch.setattr(adam_update, "widening_chunks", chunks)
        for batch in make_batches(12):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch[0]).float(), batch[1])
            loss.backward()
            opt.step(loss=loss)
        return snapshot(model), max(widest)

    whole, widest_whole = train(limit=1 << 30)
    sliced, widest_sliced = train(limit=40)
    assert widest_whole > 40 >= widest_sliced
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name


def test_a_bf16_step_allocates_the_widened_block_a_slice_at_a_time(monkeypatch):
    # What step() allocates, from the profiler's own allocation events: with the whole block
    # widened at once it is 4 bytes per selected coordinate; in slices, about one tensor's.
    from blockllm.app.bench.allocations import peak_allocated

    real_chunks = adam_update.widening_chunks

    def step_peak(limit):
        torch.manual_seed(0)
        model = TinyNet(width=64, depth=4).to(torch.bfloat16)
        opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.5, trigger="interval",
                       patience=100, rest="none")  # fmt: skip
        monkeypatch.setattr(adam_update, "widening_chunks",
                            lambda params, grads: real_chunks(params, grads, limit))  # fmt: skip
        for index, (tokens, labels) in enumerate(make_batches(3)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(tokens).float(), labels).backward()
            if index < 2:  # the selection, then an ordinary step
                opt.step()
                continue
            peak = peak_allocated(opt.step)
        return peak, opt.num_selected

    whole, selected = step_peak(1 << 30)
    sliced, _ = step_peak(64)
    assert whole >= 4 * selected  # every selected gradient widened to fp32 at once
    assert sliced < whole / 3


_HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_an_ordinary_step_waits_for_the_device_once(monkeypatch, max_grad_norm):
    # On a GPU every read of a tensor's value on the host waits for all queued work. An ordinary
    # step of the default needs one: whether to skip it (the finiteness of what the hooks
    # stepped with and of what Adam holds, read together; with a clip, its norm, read anyway).
    # A NaN gradient that the rest rule met in its hook: that one read still skips the step.
    model = TinyNet(width=32)
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.8, trigger="interval",
                   patience=100, max_grad_norm=max_grad_norm)  # fmt: skip
    reads = []
    for step, (tokens, labels) in enumerate(make_batches(5)):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        value = loss.item()
        if step == 4:  # one unselected tensor's gradient turned NaN before its hook used it
            opt.zero_grad()
            frozen = next(p for n, p in model.named_parameters() if n not in opt.selected)
            handle = frozen.register_hook(lambda grad: grad * float("nan"))
            torch.nn.functional.cross_entropy(model(tokens), labels).backward()
            handle.remove()
            before = snapshot(model)
        with monkeypatch.context() as patch:
            for name in _HOST_READS:
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _original=original, _step=step, **kwargs):
                    reads.append(_step)
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            opt.step(loss=value)
    # Steps 0 (the selection) and 4 (skipped) may read more; the ordinary ones read once.
    assert [reads.count(step) for step in (1, 2, 3)] == [1, 1, 1]
    assert opt.num_skipped_steps == 1
    after = snapshot(model)
    assert all(torch.equal(after[n], before[n]) for n in opt.selected)  # Adam's part untouched


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])  # 1.0: the clip's norm decides
def test_non_finite_loss_or_gradient_skips_the_step(caplog, max_grad_norm):
    model = TinyNet()
    # Dense gradients (no compacting), so that a NaN can be planted in a .grad below.
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, trigger="interval", patience=3,
                   compact_grads=False, max_grad_norm=max_grad_norm)  # fmt: skip
    batches = make_batches(12)
    caplog.set_level(logging.WARNING, logger="blockllm")
    skipped_at = {2, 3, 6, 9}
    for step, batch in enumerate(batches):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        before_params = snapshot(model)
        before_state = {p: copy.deepcopy(dict(state)) for p, state in opt.state.items()}
        before_selection = list(opt.selected)
        if step == 2:
            loss = torch.tensor(float("nan"))
        if step in (3, 9):
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")
        if step == 6:
            loss = float("inf")
        opt.step(loss=loss)
        if step in skipped_at:
            after = snapshot(model)
            assert all(torch.equal(before_params[n], after[n]) for n in after)
            assert opt.selected == before_selection
            for param, state in before_state.items():
                for key, value in state.items():
                    assert torch.equal(opt.state[param][key], value)
    assert opt.num_skipped_steps == len(skipped_at)
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1  # logged once, counted always
    # training went on after the bad steps
    assert opt.num_steps == len(batches) - len(skipped_at)
