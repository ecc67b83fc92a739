"""Adam state lifecycle, checkpoints and resume equivalence."""

import io
import re

import pytest
import torch
from torch import nn

from blockllm import BlockLLM, StateDictMismatchError
from tests.optim.helpers import TinyNet, loss_of, make_batches, train_steps


def one_step(model, opt, batch, loss_value=None):
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, batch)
    loss.backward()
    opt.step(loss=loss if loss_value is None else loss_value)
    return loss


def test_state_exists_only_for_selected_tensors_and_follows_the_selection():
    model = TinyNet(width=24, depth=4)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.85, trigger="interval", patience=3)
    params = dict(model.named_parameters())
    batches = make_batches(30)
    previous_selected: set[str] = set()
    for batch in batches:
        reselecting = opt.selection_pending
        one_step(model, opt, batch)
        selected = set(opt.selected)
        with_state = {n for n, p in params.items() if opt.state.get(p)}
        assert with_state == selected  # leaving tensors lost their state at once
        for name in selected - previous_selected:
            assert reselecting
            assert opt.state[params[name]]["step"].item() == 1  # entering: fresh zero moments
        previous_selected = selected
    assert opt.num_reselections >= 8


def test_staying_tensor_keeps_moments_across_a_reselection():
    model = TinyNet(width=16)
    # score by random draws but with sparsity low enough that the same big tensors stay
    opt = BlockLLM(model.named_parameters(), sparsity=0.05, trigger="interval", patience=2)
    batches = make_batches(6)
    for batch in batches[:2]:
        one_step(model, opt, batch)
    params = dict(model.named_parameters())
    steps_before = {n: opt.state[params[n]]["step"].item() for n in opt.selected}
    one_step(model, opt, batches[2])  # the reselection step
    assert opt.num_reselections == 1
    kept = [n for n in opt.selected if n in steps_before and opt.coordinates(n) is None]
    assert kept
    for name in kept:
        assert opt.state[params[name]]["step"].item() == steps_before[name] + 1


def save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume(model, opt, build, **kwargs):
    """A checkpoint of ``model`` and ``opt`` (through ``torch.save``) loaded into a fresh model
    from ``build()`` and a fresh ``BlockLLM(**kwargs)``; returns the clone, the resumed optimizer
    and the saved optimizer state."""
    saved_opt = save_load(opt.state_dict())
    clone = build()
    clone.load_state_dict(model.state_dict())
    resumed = BlockLLM(clone.named_parameters(), **kwargs)
    resumed.load_state_dict(saved_opt)
    return clone, resumed, saved_opt


def train_both(runs, batches):
    """One step per batch of each (model, optimizer) pair: the uninterrupted run and the resumed."""
    for batch in batches:
        for model, opt in runs:
            one_step(model, opt, batch)


def assert_same_weights(model, clone):
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("selection", ["tensor", "mask"])
@pytest.mark.parametrize("trigger", ["loss", "interval"])
def test_resume_is_bit_for_bit_across_a_reselection(selection, trigger):
    torch.manual_seed(0)
    model = TinyNet(width=24)
    kwargs = dict(lr=1e-2, weight_decay=0.01, sparsity=0.9, patience=4, trigger=trigger,
                  selection=selection, score="grad_norm")  # fmt: skip
    opt = BlockLLM(model.named_parameters(), **kwargs)
    batches = make_batches(40)
    losses = [10.0 - 0.01 * i for i in range(6)] + [5.0] * 34  # the loss trigger fires too
    for batch, value in zip(batches[:7], losses[:7]):
        one_step(model, opt, batch, value)
    clone, resumed, _ = resume(model, opt, lambda: TinyNet(width=24), **kwargs)
    assert resumed.selected == opt.selected
    assert resumed.selection_pending == opt.selection_pending
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        assert a.requires_grad == b.requires_grad, name

    for batch, value in zip(batches[7:], losses[7:]):
        one_step(model, opt, batch, value)
        one_step(clone, resumed, batch, value)
        assert resumed.selected == opt.selected
    assert opt.num_reselections >= 3
    assert resumed.num_reselections == opt.num_reselections
    assert_same_weights(model, clone)


def test_random_scoring_resumes_with_the_same_generator_state():
    model = TinyNet()
    kwargs = dict(sparsity=0.9, score="random", trigger="interval", patience=2, seed=5)
    opt = BlockLLM(model.named_parameters(), **kwargs)
    batches = make_batches(12)
    train_steps(model, opt, batches[:5])
    clone = TinyNet()
    clone.load_state_dict(model.state_dict())
    resumed = BlockLLM(clone.named_parameters(), **kwargs)
    resumed.load_state_dict(save_load(opt.state_dict()))
    train_steps(model, opt, batches[5:])
    train_steps(clone, resumed, batches[5:])
    assert opt.selected == resumed.selected
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))


def test_state_dict_from_a_different_model_is_refused():
    opt = BlockLLM(TinyNet(width=16).named_parameters(), sparsity=0.9)
    other = BlockLLM(TinyNet(width=16, depth=2).named_parameters(), sparsity=0.9)
    with pytest.raises(StateDictMismatchError, match="different model"):
        other.load_state_dict(opt.state_dict())
    wider = BlockLLM(TinyNet(width=20).named_parameters(), sparsity=0.9)
    with pytest.raises(ValueError, match=r"'embed.weight' has 512 elements there, 640 here"):
        wider.load_state_dict(opt.state_dict())
    adamw = torch.optim.AdamW(TinyNet().parameters())
    with pytest.raises(ValueError, match="no 'blockllm' section"):
        opt.load_state_dict(adamw.state_dict())
    bad_version = opt.state_dict()
    bad_version["blockllm"]["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        opt.load_state_dict(bad_version)
    sparser = BlockLLM(TinyNet(width=16).named_parameters(), sparsity=0.95)
    with pytest.raises(ValueError, match="budget"):
        sparser.load_state_dict(opt.state_dict())


def test_frozen_tensors_are_bitwise_unchanged_over_training():
    model = TinyNet(width=24)
    opt = BlockLLM(model.named_parameters(), lr=5e-2, weight_decay=0.5, sparsity=0.9,
                   trigger="interval", patience=1000, rest="none")  # fmt: skip
    one_step(model, opt, make_batches(1)[0])
    selected = list(opt.selected)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in selected}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in selected}
    train_steps(model, opt, make_batches(25))
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value)
    # The test proves something only if some tensors were frozen and the others trained.
    assert frozen and opt.selected == selected
    assert any(not torch.equal(params[name], value) for name, value in trained.items())


def test_state_dict_for_tensors_of_another_shape_is_refused():
    # Same names and element counts, other shapes: the moments would be applied wrongly.
    square = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 4, bias=False))
    wide = nn.Sequential(nn.Linear(64, 16, bias=False), nn.Linear(32, 4, bias=False))
    saved = BlockLLM(square.named_parameters(), sparsity=0.0)
    square(torch.randn(3, 32)).sum().backward()
    saved.step(loss=1.0)
    state = saved.state_dict()
    target = BlockLLM(wide.named_parameters(), sparsity=0.0)
    with pytest.raises(StateDictMismatchError, match=re.escape(
        "Invalid state_dict: it is from a different model ('0.weight' has shape (32, 32) "
        "there, (16, 64) here)"
    )):  # fmt: skip
        target.load_state_dict(state)
    # A checkpoint without shapes (older format) is still checked through its moments.
    del state["blockllm"]["shapes"]
    with pytest.raises(StateDictMismatchError, match=re.escape(
        "Invalid state_dict: its exp_avg of '0.weight' has shape (32, 32), (16, 64) expected here"
    )):  # fmt: skip
        target.load_state_dict(state)


def test_state_dict_of_full_precision_tensors_is_refused_for_bf16_ones():
    model = nn.Linear(16, 16)
    saved = BlockLLM(model.named_parameters(), sparsity=0.0)
    model(torch.randn(2, 16)).sum().backward()
    saved.step(loss=1.0)
    low = nn.Linear(16, 16).to(torch.bfloat16)
    target = BlockLLM(low.named_parameters(), sparsity=0.0)
    with pytest.raises(StateDictMismatchError, match="has no fp32 master copy"):
        target.load_state_dict(saved.state_dict())


def _stack_of_eight():
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in range(8)))


def _sweep_steps(model, opt, inputs):
    for x in inputs:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step(loss=loss)


# Eight equal tensors, two selected at a time in FRUGAL's cyclic order, a new pair every step:
# the pair (6, 7) is selected at steps 1 and 5 (its second turn).
# rest="sign": a rest rule without state, so the optimizer state counted below is Adam's alone.
_SWEEP = dict(lr=1e-2, sparsity=0.75, score="cyclic", trigger="interval", patience=1,
              max_tensor_share=1.0, rest="sign")  # fmt: skip


@pytest.mark.parametrize("keep", [False, True])
def test_keep_moments_resumes_a_returning_tensor_where_it_left(keep):
    model = _stack_of_eight()
    opt = BlockLLM(model.named_parameters(), keep_moments=keep, **_SWEEP)
    inputs = torch.randn(5, 4, 8)
    last = model[7].weight
    _sweep_steps(model, opt, inputs[:1])
    moments = {key: opt.state[last][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    _sweep_steps(model, opt, inputs[1:4])
    assert last not in opt.state or not opt.state[last]  # away: no state in the update's view
    state_bytes = opt.memory_report()["optimizer_state"]
    if keep:  # the three pairs that left keep their two moments (8 x 8 fp32) and step each
        assert state_bytes == 2 * (2 * 64 * 4 + 4) + 6 * (2 * 64 * 4 + 4)
    else:
        assert state_bytes == 2 * (2 * 64 * 4 + 4)
    opt.zero_grad(set_to_none=True)
    model(inputs[4]).square().mean().backward()
    grad = last.grad.clone()
    opt.step(loss=1.0)
    assert opt.selected == ["6.weight", "7.weight"]
    state = opt.state[last]
    assert state["step"].item() == (2 if keep else 1)
    # Adam's first moment after one more gradient: from the kept moment, or from zero.
    start = moments["exp_avg"] if keep else torch.zeros_like(grad)
    torch.testing.assert_close(state["exp_avg"], 0.9 * start + 0.1 * grad)


def test_keep_moments_resume_is_bit_for_bit_with_tensors_away():
    inputs = torch.randn(9, 4, 8)
    model = _stack_of_eight()
    opt = BlockLLM(model.named_parameters(), keep_moments=True, **_SWEEP)
    _sweep_steps(model, opt, inputs[:3])  # three pairs have left, with their moments kept
    clone, resumed, saved_opt = resume(model, opt, _stack_of_eight, keep_moments=True, **_SWEEP)
    assert set(saved_opt["blockllm"]["parked"]) == {"4.weight", "5.weight", "6.weight", "7.weight"}
    _sweep_steps(model, opt, inputs[3:])
    _sweep_steps(clone, resumed, inputs[3:])
    assert_same_weights(model, clone)
    assert resumed.memory_report() == opt.memory_report()


def test_kept_moments_of_another_shape_are_refused():
    model = _stack_of_eight()
    opt = BlockLLM(model.named_parameters(), keep_moments=True, **_SWEEP)
    _sweep_steps(model, opt, torch.randn(2, 4, 8))
    state = opt.state_dict()
    state["blockllm"]["parked"]["7.weight"]["exp_avg"] = torch.zeros(4, 16)
    with pytest.raises(StateDictMismatchError, match=re.escape(
        "Invalid state_dict: its kept exp_avg of '7.weight' has shape (4, 16), (8, 8) expected here"
    )):  # fmt: skip
        BlockLLM(_stack_of_eight().named_parameters(), keep_moments=True, **_SWEEP).load_state_dict(state)
