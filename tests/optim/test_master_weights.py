"""``master_weights=False``: Adam steps bf16 weights without fp32 master copies.

The update is Adam's fp32 arithmetic on the widened bf16 values, written back with stochastic
rounding (or to nearest with ``stochastic_rounding=False``), a bounded chunk at a time.
"""

import pytest
import torch

from blockllm import BlockLLM
from blockllm.errors import StateDictMismatchError
from blockllm.optim import adam_update
from tests.optim.helpers import TinyNet, loss_of, make_batches, snapshot
from tests.optim.test_state import (
    assert_same_weights,
    one_step,
    resume,
    save_load,
    train_both,
)


def _bf16_net(**kwargs):
    torch.manual_seed(0)
    return TinyNet(**kwargs).to(torch.bfloat16)


def _train(model, opt, batches):
    for batch in batches:
        one_step(model, opt, batch)


def test_without_masters_the_step_is_adamw_on_the_widened_weights_rounded_to_nearest():
    # Every tensor selected: each step must equal torch's fused AdamW run on an fp32 copy of the
    # bf16 weights (refreshed from them every step: nothing but the bf16 values carries over),
    # rounded to nearest.
    model = _bf16_net(width=24)
    reference = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.01, fused=True)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, weight_decay=0.01, sparsity=0.0,
                   rest="none", master_weights=False, stochastic_rounding=False)  # fmt: skip
    for batch in make_batches(8):
        one_step(model, opt, batch)
        with torch.no_grad():
            for ref, param in zip(reference, model.parameters()):
                ref.grad = param.grad.float() if param.grad is not None else None
        adamw.step()
        with torch.no_grad():
            for ref, param in zip(reference, model.parameters()):
                assert torch.equal(ref.to(torch.bfloat16), param), "weights parted"
                ref.copy_(param.float())
    assert opt.memory_report()["master_weights"] == 0
    assert all("master" not in state for state in opt.state.values())


@pytest.mark.parametrize("stochastic", [False, True])
def test_chunks_change_no_bit_of_training(monkeypatch, stochastic):
    # Whole and partly selected blocks (rows), entering and leaving, trained with tiny chunks and
    # with one chunk per block: the same bits, the step counter advanced once per step. (With
    # bf16 moments too the three roundings of a chunk interleave their draws, so chunks change
    # which noise rounds what; only the bits change, not the distribution.)
    moment_dtype = "float32"

    def train(chunk):
        monkeypatch.setattr(adam_update, "WIDENING_CHUNK", chunk)
        model = _bf16_net(width=32)
        opt = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.6, trigger="interval",
                       patience=3, master_weights=False, moment_dtype=moment_dtype,
                       stochastic_rounding=stochastic)  # fmt: skip
        _train(model, opt, make_batches(10))
        steps = {n: int(opt.state[p]["step"]) for n, p in model.named_parameters() if opt.state.get(p)}
        return snapshot(model), steps, opt.num_reselections

    whole, whole_steps, reselections = train(1 << 30)
    # Stochastic rounding draws its noise chunk by chunk from one stream: the same numbers in the
    # same order, so chunks of 7 entries round as one chunk does.
    sliced, sliced_steps, _ = train(7)
    assert reselections >= 2
    assert whole_steps == sliced_steps and max(whole_steps.values()) >= 2
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name


def test_stochastic_rounding_keeps_small_adam_steps_that_nearest_rounding_loses():
    # Weights at 1.0 (a bf16 unit there is 2**-7) stepped by Adam with lr 1e-3 against a constant
    # gradient: each step (about lr) is below half a unit, so round-to-nearest never moves them;
    # stochastic rounding moves them by lr a step on average.
    def final(stochastic):
        weight = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = BlockLLM([("w", weight)], lr=1e-3, sparsity=0.0, rest="none",
                       master_weights=False, stochastic_rounding=stochastic)  # fmt: skip
        for _ in range(100):
            weight.grad = torch.ones_like(weight)
            opt.step()
        return weight.detach().float()

    assert torch.equal(final(False), torch.ones(8192))
    moved = 1.0 - final(True).mean().item()
    assert abs(moved - 100 * 1e-3) < 0.005  # fp32 Adam moves every weight by 0.1 (lr a step)


def test_without_masters_training_follows_the_masters_run_closely():
    batches = make_batches(40)
    losses = {}
    for masters in (True, False):
        model = _bf16_net(width=32)
        opt = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.8, trigger="interval",
                       patience=5, master_weights=masters)  # fmt: skip
        losses[masters] = [one_step(model, opt, batch).item() for batch in batches]
        report = opt.memory_report()
        assert (report["master_weights"] > 0) == masters
    for masters, run in losses.items():
        assert sum(run[-10:]) / 10 < sum(run[:10]) / 10 - 0.1, masters  # both learn
    assert abs(sum(losses[True][-10:]) - sum(losses[False][-10:])) / 10 < 0.05


def test_state_bytes_lose_exactly_the_masters():
    reports = {}
    for masters in (True, False):
        model = _bf16_net(width=24)
        opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, trigger="interval",
                       patience=100, master_weights=masters)  # fmt: skip
        _train(model, opt, make_batches(2))
        reports[masters] = opt.memory_report()
    assert reports[True]["master_weights"] == 4 * opt.num_selected
    assert reports[False]["master_weights"] == 0
    for key in ("params", "grads", "optimizer_state"):
        assert reports[True][key] == reports[False][key], key


def test_fp16_weights_keep_their_masters():
    torch.manual_seed(0)
    model = TinyNet(width=16).to(torch.float16)
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.5, rest="none",
                   master_weights=False)  # fmt: skip
    _train(model, opt, make_batches(2))
    assert opt.memory_report()["master_weights"] == 4 * opt.num_selected


@pytest.mark.parametrize("rest", ["none", "factored"])
def test_resume_without_masters_is_bit_for_bit_across_a_reselection(rest):
    model = _bf16_net(width=24)
    kwargs = dict(lr=1e-2, sparsity=0.8, patience=4, trigger="interval", rest=rest,
                  master_weights=False)  # fmt: skip
    opt = BlockLLM(model.named_parameters(), **kwargs)
    batches = make_batches(24)
    _train(model, opt, batches[:7])
    clone, resumed, _ = resume(model, opt, lambda: TinyNet(width=24).to(torch.bfloat16), **kwargs)
    train_both([(model, opt), (clone, resumed)], batches[7:])
    assert opt.num_reselections >= 3
    assert_same_weights(model, clone)


def test_a_checkpoint_with_masters_resumes_without_them_and_not_the_other_way():
    model = _bf16_net(width=24)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, patience=100,
                   trigger="interval")  # fmt: skip
    batches = make_batches(6)
    _train(model, opt, batches[:3])
    assert opt.memory_report()["master_weights"] > 0
    build = lambda: TinyNet(width=24).to(torch.bfloat16)  # noqa: E731
    clone, resumed, _ = resume(model, opt, build, lr=1e-2, sparsity=0.8, patience=100,
                               trigger="interval", master_weights=False)  # fmt: skip
    assert resumed.memory_report()["master_weights"] == 0
    assert resumed.selected == opt.selected
    _train(clone, resumed, batches[3:])

    saved = save_load(resumed.state_dict())
    fresh = BlockLLM(build().named_parameters(), lr=1e-2, sparsity=0.8, patience=100,
                     trigger="interval")  # fmt: skip
    with pytest.raises(StateDictMismatchError, match="resume with master_weights=False"):
        fresh.load_state_dict(saved)


def test_the_knob_goes_through_a_config():
    from blockllm import BlockLLMConfig

    config = BlockLLMConfig(master_weights=False)
    model = _bf16_net(width=16)
    opt = BlockLLM(model.named_parameters(), lr=1e-3, config=config, sparsity=0.5)
    _train(model, opt, make_batches(2))
    assert opt.config.master_weights is False
    assert opt.memory_report()["master_weights"] == 0
    assert loss_of(model, make_batches(1)[0]).isfinite()
