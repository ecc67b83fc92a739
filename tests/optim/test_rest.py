"""A state-free rule for the rest: every candidate moves every step, Adam state only for the block.

The rest step runs in the gradient hooks and frees each gradient as it lands; these tests pin
down that it is the same arithmetic as stepping in ``step()`` from held gradients, that
accumulation and clipping mean what they mean for one big batch, and that no full-model
gradient is ever held.
"""

import copy
import re

import pytest
import torch
from torch import nn

from blockllm import BlockLLM, NoMatchingParamsError
from blockllm.config import BlockLLMConfig
from blockllm.selection.rest_rules import (
    ColumnNormRest,
    FactoredRest,
    SignRest,
    _sums_of_squares,
)
from tests.optim.test_llama import patterned_batches, tiny_llama


def train(steps=30, accumulate=1, clip=None, hold=True, model=None, **options):
    model = model if model is not None else tiny_llama()
    settings = dict(lr=3e-3, sparsity=0.9, trigger="interval", patience=7, fused=False)
    optimizer = BlockLLM(model.named_parameters(), **{**settings, **options})
    batches = list(patterned_batches(steps))
    norms = []
    for step in range(steps):
        for micro in range(accumulate):  # micro-batches split the same batch of 8
            tokens = batches[step].chunk(accumulate)[micro]
            last = micro == accumulate - 1
            with optimizer.hold_gradients() if hold and not last else torch.enable_grad():
                (model(input_ids=tokens, labels=tokens).loss / accumulate).backward()
        if clip is not None:
            norms.append(float(optimizer.clip_grad_norm_(clip)))
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, norms


def max_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def differing_fraction(a, b, tolerance):
    """The share of all weight entries of ``a`` and ``b`` more than ``tolerance`` apart."""
    pairs = list(zip(a.parameters(), b.parameters()))
    apart = sum(int(((p - q).abs() > tolerance).sum()) for p, q in pairs)
    return apart / sum(p.numel() for p, _ in pairs)


@pytest.mark.parametrize("rule", ["sign", "colnorm", "factored"])
def test_stepping_in_the_hooks_equals_stepping_in_step(rule):
    in_hooks, optimizer, _ = train(rest=rule)
    in_step, _, _ = train(rest=rule, rest_in_backward=False)
    assert optimizer.num_reselections >= 3
    assert max_difference(in_hooks, in_step) == 0.0


def test_the_rest_moves_every_candidate_at_every_step():
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, rest="sign",
                         trigger="interval", patience=100)  # fmt: skip
    for tokens in patterned_batches(2):  # a selection step, then an ordinary one
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            assert not torch.equal(p, before[name]), name
    # Adam state exists for the selected block only.
    stateful = {name for name, p in model.named_parameters() if optimizer.state.get(p)}
    assert stateful == set(optimizer.selected) and len(stateful) < len(before)


def _two_linears_after_selection(dtype=torch.float32, **options):
    """A 3 -> 3 -> 200 net at lr 0.1, rest_lr_scale 0.3, rest_weight_decay 0.2, after its
    selection step: the small matrix in the block whole, some rows of the large one. Returns
    the model, the optimizer and those rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 200, bias=False)).to(dtype)
    optimizer = BlockLLM(
        model.named_parameters(), lr=0.1, weight_decay=0.5, sparsity=0.9, rest_lr_scale=0.3,
        rest_weight_decay=0.2, trigger="interval", patience=100, **options,
    )  # fmt: skip
    model(torch.randn(4, 3).to(dtype)).float().square().mean().backward()
    optimizer.step(loss=1.0)
    optimizer.zero_grad()
    rows = optimizer.coordinates("1.weight").long().reshape(-1, 3)[:, 0] // 3
    assert optimizer.selected == ["0.weight", "1.weight"] and 0 < len(rows) < 200
    return model, optimizer, rows


def test_rest_step_arithmetic_with_scale_and_weight_decay():
    model, optimizer, rows = _two_linears_after_selection(rest="colnorm")
    weight = model[1].weight
    before = weight.detach().clone()
    grads = []
    weight.register_hook(lambda grad: grads.append(grad.detach().clone()))
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step(loss=1.0)
    grad = grads[0]
    rms = grad.square().mean(dim=1, keepdim=True).sqrt()
    expected = before - 0.1 * 0.3 * grad / rms - 0.1 * 0.2 * before
    rest = torch.ones(200, dtype=torch.bool)
    rest[rows] = False
    torch.testing.assert_close(weight.detach()[rest], expected[rest])
    assert not torch.allclose(weight.detach()[~rest], expected[~rest])  # Adam's rows
    assert ColumnNormRest().direction(grad * 7.0).allclose(ColumnNormRest().direction(grad))
    assert torch.equal(SignRest().direction(grad * 7.0), SignRest().direction(grad))


@pytest.mark.parametrize("rest_in_backward", [True, False])
@pytest.mark.parametrize(("rule", "clip"), [("colnorm", None), ("auto", 0.5)])
def test_accumulation_with_held_gradients_is_one_big_batch(rule, clip, rest_in_backward):
    # Held for the last backward's hooks, or all stepped in step(): the clipped default rule
    # too, since the rest steps with the unclipped accumulated gradient either way.
    options = dict(steps=12, rest=rule, sparsity=0.8, clip=clip)
    big, _, _ = train(**options)
    micro, _, _ = train(accumulate=2, rest_in_backward=rest_in_backward, **options)
    assert max_difference(big, micro) < 1e-4


@pytest.mark.parametrize("held_for", ["the last backward", "step()"])
def test_a_selection_step_under_accumulation_ranks_the_whole_steps_gradient(held_for):
    # A rest rule keeps every gradient until the step's gradient is whole (hold_gradients()
    # for the last backward's hooks, or rest_in_backward=False for step()), so the selection
    # is ranked on it as for one big batch, not on the first micro-batch's (0.6.4: another
    # tensor selected at the reselection, 9e-3 apart). float64: only summation order is left.
    in_step = held_for == "step()"
    options = dict(steps=10, sparsity=0.5)
    big, big_optimizer, _ = train(model=tiny_llama().double(), **options)
    micro, micro_optimizer, _ = train(model=tiny_llama().double(), accumulate=2, hold=not in_step,
                                      rest_in_backward=not in_step, **options)  # fmt: skip
    assert big_optimizer.num_reselections == micro_optimizer.num_reselections >= 1
    assert big_optimizer.selected == micro_optimizer.selected
    assert max_difference(big, micro) < 1e-12


def test_accumulation_without_holding_is_refused_with_the_fix():
    message = "wrap every backward but the last in `with optimizer.hold_gradients():`"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        train(steps=3, accumulate=2, hold=False, rest="sign")
    # Stepping in step() needs no hold.
    train(steps=3, accumulate=2, hold=False, rest="sign", rest_in_backward=False)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_clipping_sees_the_whole_gradient_norm(dtype, rtol):
    # The norm the optimizer clips against equals torch's norm over every gradient, although
    # most of them were used and freed in the hooks before the clip was called. fp64 weights
    # have it summed in fp64, as torch does (until 0.6.7 in fp32: 1.6e-9 apart, relative, here).
    model = tiny_llama().to(dtype)
    twin = tiny_llama().to(dtype)
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, rest="sign",
                         trigger="interval", patience=3, compact_grads=True)  # fmt: skip
    for tokens in patterned_batches(8):
        twin.load_state_dict(model.state_dict())
        twin.zero_grad(set_to_none=True)
        twin(input_ids=tokens, labels=tokens).loss.backward()
        expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()])
        model(input_ids=tokens, labels=tokens).loss.backward()
        total = optimizer.clip_grad_norm_(0.5)
        assert total.dtype == dtype
        torch.testing.assert_close(total, expected, rtol=rtol, atol=0)
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
    assert optimizer.num_reselections >= 2


@pytest.mark.parametrize("rule", ["auto", "sign", "colnorm"])
def test_clipping_then_stepping_in_hooks_or_in_step_agree_across_a_reselection(rule):
    # The rest steps with the unclipped gradient wherever it runs (the clip's coefficient
    # scales Adam's part only), so the factored statistics, of the default rule and of the
    # vocabulary's, see the same values in the hooks and in step(). Until 0.6.5 step() clipped
    # first: 2e-2 apart after 12 steps, the norms 2 % apart. Over many steps the rounding of the
    # two norm sums is amplified chaotically (signs flip); over 12 they agree to rounding.
    options = dict(steps=12, clip=0.5, rest=rule)
    in_hooks, optimizer, norms_hooks = train(**options)
    in_step, _, norms_step = train(rest_in_backward=False, **options)
    assert optimizer.num_reselections >= 1
    if rule != "sign":
        assert max_difference(in_hooks, in_step) < 1e-5
        assert norms_hooks == pytest.approx(norms_step, rel=1e-6)
        return
    # The sign of a gradient entry near zero turns a rounding-level difference (the two paths
    # sum the clip's norm in another order) into a whole step of 2 lr, and which entries sit
    # near zero depends on the CPU's kernels: on one machine the runs were equal, on another
    # 2.7 % of the entries differed after 12 steps (the norms by 3e-4). So the sign rule is held
    # to what separates the semantics: 0.6.4 parted on 50 % of the entries, the norms by 2e-2.
    assert differing_fraction(in_hooks, in_step, 1e-5) < 0.1
    assert norms_hooks == pytest.approx(norms_step, rel=2e-3)


@pytest.mark.parametrize("rest", ["auto", "none"])
def test_a_second_clip_measures_the_norm_the_first_left(rest):
    # As torch's clip called twice: the second sees the clipped gradient (with a rest rule the
    # coefficient waits for the step, so the second multiplies onto the first).
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, rest=rest,
                         trigger="interval", patience=3)  # fmt: skip
    for tokens in patterned_batches(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        first = float(optimizer.clip_grad_norm_(0.1))
        second = float(optimizer.clip_grad_norm_(0.1))
        assert first > 0.2
        assert second == pytest.approx(0.1, rel=1e-4)
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)


def _poisoned_step(optimizer, model, tokens, poison=None, loss=None):
    """One step; ``poison`` (a parameter) gets an infinite gradient, ``loss`` is passed as is."""
    handle = None if poison is None else poison.register_hook(lambda g: torch.full_like(g, float("inf")))
    value = model(input_ids=tokens, labels=tokens).loss
    value.backward()
    if handle is not None:
        handle.remove()
    optimizer.step(loss=value if loss is None else loss)
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fault", ["inf-grad", "nan-loss"])
def test_rest_in_step_skips_a_bad_step_with_nothing_changed(fault):
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, trigger="interval",
                         patience=3, rest_in_backward=False)  # fmt: skip
    batches = list(patterned_batches(8))
    for tokens in batches[:4]:
        _poisoned_step(optimizer, model, tokens)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = copy.deepcopy(optimizer.state_dict())
    poison = model.model.layers[0].mlp.up_proj.weight if fault == "inf-grad" else None
    _poisoned_step(optimizer, model, batches[4], poison, float("nan") if fault == "nan-loss" else None)
    assert optimizer.num_skipped_steps == 1
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]), name
    state = optimizer.state_dict()
    assert state["blockllm"]["rest"]["rule"].keys() == saved["blockllm"]["rest"]["rule"].keys()
    for name, values in saved["blockllm"]["rest"]["rule"].items():  # the factored statistics
        for key, value in values.items():
            assert torch.equal(state["blockllm"]["rest"]["rule"][name][key], value), (name, key)
    for tokens in batches[5:]:  # and training goes on
        _poisoned_step(optimizer, model, tokens)
    assert optimizer.num_steps == 7


def test_rest_in_hooks_skips_per_tensor_and_keeps_factored_statistics_finite():
    # In the hooks the rest steps as each gradient lands, before the step can know of a fault
    # elsewhere: a tensor with a non-finite gradient takes no step, Adam's update is skipped,
    # and the factored statistics never take in the bad gradient (they once went NaN for good).
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, trigger="interval",
                         patience=3)  # fmt: skip
    batches = list(patterned_batches(10))
    for tokens in batches[:4]:
        _poisoned_step(optimizer, model, tokens)
    head = model.lm_head.weight
    # Partly selected or not, the head's unselected rows take the factored rest step.
    assert "lm_head.weight" in optimizer.state_dict()["blockllm"]["rest"]["rule"]
    before_head = head.detach().clone()
    adam = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    _poisoned_step(optimizer, model, batches[4], poison=head)
    assert optimizer.num_skipped_steps == 1
    assert torch.equal(head, before_head)
    for param, values in adam.items():
        for key, value in values.items():
            assert torch.equal(optimizer.state[param][key], value)
    for tokens in batches[5:]:
        _poisoned_step(optimizer, model, tokens)
    assert optimizer.num_steps == 9
    assert all(torch.isfinite(p).all() for p in model.parameters())
    statistics = optimizer.state_dict()["blockllm"]["rest"]["rule"]["lm_head.weight"]
    assert all(torch.isfinite(value).all() for value in statistics.values())
    assert not torch.equal(head, before_head)


@pytest.mark.parametrize("rule", ["sign", "factored"])
def test_shortlists_split_the_rest_step_without_changing_it(rule):
    # On a selection step a partly selected vocabulary matrix keeps only its shortlist's
    # gradient: the rest steps the coordinates outside it at once and the shortlist's own
    # (less Adam's pick) at the step. Same arithmetic as the dense gradient, less memory held.
    options = dict(steps=16, rest=rule, vocab_rest=None, max_tensor_share=0.25, patience=3)
    dense, dense_opt, _ = train(compact_grads=False, **options)
    split, split_opt, _ = train(compact_grads=True, **options)
    assert split_opt.num_reselections == dense_opt.num_reselections >= 4
    assert max_difference(dense, split) == 0.0
    largest = max(p.numel() * 4 for p in split.parameters())
    assert split_opt.peak_selection_grad_bytes < dense_opt.peak_selection_grad_bytes
    # The plan's whole tensors (at most the budget), shortlists, and the tensor landing.
    assert split_opt.peak_selection_grad_bytes <= 4 * split_opt.budget + largest


def test_no_full_gradient_is_held_during_backward():
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, rest="colnorm",
                         compact_grads=True, trigger="interval", patience=3)  # fmt: skip
    params = dict(model.named_parameters())
    largest = max(p.numel() * p.element_size() for p in params.values())
    peaks = []

    def probe(_):
        if optimizer.selection_pending:
            return  # a selection step holds the scoring plan's gradients (tested elsewhere)
        selected = set(optimizer.selected)
        held = sum(p.grad.numel() * 4 for n, p in params.items()
                   if p.grad is not None and n not in selected)  # fmt: skip
        peaks.append(held)

    # Registered after the optimizer's hooks, so each probe sees the state they leave behind.
    for p in params.values():
        p.register_post_accumulate_grad_hook(probe)
    for tokens in patterned_batches(7):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
    assert len(peaks) >= 4 * len(params)  # four ordinary backward passes were probed
    assert max(peaks) <= largest, (max(peaks), largest)
    assert max(peaks) < 0.1 * sum(p.numel() * 4 for p in params.values())


def test_always_adam_tensors_train_whole_outside_the_budget():
    model = tiny_llama()
    norms = r".*norm\.weight"
    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.95, rest="sign",
                         always_adam=norms, trigger="interval", patience=2)  # fmt: skip
    pinned = {n for n, _ in model.named_parameters() if re.fullmatch(norms, n)}
    budget_numel = sum(p.numel() for n, p in model.named_parameters() if n not in pinned)
    assert optimizer.budget == int(0.05 * budget_numel)
    for tokens in patterned_batches(6):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
        assert pinned <= set(optimizer.selected)
        assert optimizer.num_selected <= optimizer.budget
    with pytest.raises(NoMatchingParamsError, match="Invalid always_adam: 'missing'"):
        BlockLLM(tiny_llama().named_parameters(), always_adam=["missing"])


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_training(reentrant):
    # A weight stepped in its hook must not be read again by a recomputed forward.
    def run(checkpointing):
        model = tiny_llama()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        return train(steps=8, model=model, rest="colnorm", compact_grads=True)[0]

    assert max_difference(run(False), run(True)) == 0.0


@pytest.mark.parametrize("rule", ["sign", "factored"])
def test_resume_across_a_reselection_continues_exactly(rule):
    full, _, _ = train(steps=16, rest=rule)
    model = tiny_llama()
    first = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, trigger="interval",
                     patience=7, fused=False, rest=rule)  # fmt: skip
    batches = list(patterned_batches(16))
    for tokens in batches[:9]:
        model(input_ids=tokens, labels=tokens).loss.backward()
        first.step(loss=1.0)
        first.zero_grad(set_to_none=True)
    saved = first.state_dict()
    resumed_model = tiny_llama()
    resumed_model.load_state_dict(model.state_dict())
    second = BlockLLM(resumed_model.named_parameters(), lr=3e-3, sparsity=0.9,
                      trigger="interval", patience=7, fused=False, rest=rule)  # fmt: skip
    second.load_state_dict(saved)
    for tokens in batches[9:]:
        resumed_model(input_ids=tokens, labels=tokens).loss.backward()
        second.step(loss=1.0)
        second.zero_grad(set_to_none=True)
    assert second.num_reselections >= 2
    assert max_difference(full, resumed_model) == 0.0


def test_resume_under_a_scheduler_steps_the_rest_at_the_scheduled_lr():
    # torch's load_state_dict replaces the param group dicts; a scheduler then changes the new
    # ones. The rest step must follow it (it once kept reading the replaced dicts' lr).
    def run(resume_at):
        model = tiny_llama()
        make = lambda m: BlockLLM(m.named_parameters(), lr=3e-3, sparsity=0.9, fused=False,  # noqa: E731
                                  trigger="interval", patience=7)  # fmt: skip
        optimizer = make(model)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        for step, tokens in enumerate(patterned_batches(8)):
            if step == resume_at:
                saved, weights = optimizer.state_dict(), model.state_dict()
                model = tiny_llama()
                model.load_state_dict(weights)
                optimizer, schedule_state = make(model), schedule.state_dict()
                schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
                optimizer.load_state_dict(saved)  # after the scheduler set its first lr
                schedule.load_state_dict(schedule_state)
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step(loss=1.0)
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        return model

    assert max_difference(run(resume_at=None), run(resume_at=3)) == 0.0


def test_row_gradients_leave_the_rest_its_gradient():
    from blockllm import RowGradients

    plain, _, _ = train(steps=10, rest="colnorm", compact_grads=True)
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, trigger="interval",
                         patience=7, fused=False, rest="colnorm", compact_grads=True)  # fmt: skip
    assert RowGradients(model, optimizer).patched == []  # the rest needs every row's gradient
    for tokens in patterned_batches(10):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
    assert max_difference(plain, model) == 0.0


def test_stochastic_rounding_keeps_small_bf16_steps_on_average():
    from blockllm.optim.rounding import stochastic_round_to_bf16

    value = torch.full((200_000,), 1.0 + 1e-3)  # between bf16 neighbours 1.0 and 1.0078125
    rounded = stochastic_round_to_bf16(value, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - (1.0 + 1e-3)) < 2e-5
    assert torch.equal(stochastic_round_to_bf16(torch.tensor([-3.0, float("inf")]),
                                                 torch.Generator()).float(),
                       torch.tensor([-3.0, float("inf")]))  # fmt: skip

    def train(stochastic):
        # A bf16 weight of 1.0 pushed by 1e-4 per step: below half a bf16 unit (0.0039).
        weight = torch.nn.Parameter(torch.ones(4096, 8, dtype=torch.bfloat16))
        small = torch.nn.Parameter(torch.ones(8, 8))
        opt = BlockLLM([("big", weight), ("small", small)], lr=1e-4, sparsity=0.95,
                       rest="sign", stochastic_rounding=stochastic, trigger="interval",
                       patience=1000, max_tensor_share=1.0)  # fmt: skip
        for _ in range(50):
            (weight.float().sum() + 1000 * small.sum()).backward()  # "small" ranks first
            opt.step(loss=1.0)
            opt.zero_grad()
        # The rows of "big" that Adam does not update took the rest step only.
        rest = torch.ones(weight.numel(), dtype=torch.bool)
        rest[opt.coordinates("big").long()] = False
        assert opt.selected == ["big", "small"] and 0 < rest.sum() < weight.numel()
        return weight.detach().float().reshape(-1)[rest].mean().item()

    assert train(stochastic=False) == 1.0  # every step rounded away
    assert abs(train(stochastic=True) - (1.0 - 50 * 1e-4)) < 1e-3


def test_resume_with_stochastic_rounding_continues_exactly():
    def run(split):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16)).to(torch.bfloat16)
        opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, rest="sign",
                       trigger="interval", patience=3)  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        data = [torch.randn(4, 16, generator=generator).bfloat16() for _ in range(10)]
        for step, x in enumerate(data):
            if step == split:
                saved, weights = opt.state_dict(), copy.deepcopy(model.state_dict())
                model.load_state_dict(weights)
                opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, rest="sign",
                               trigger="interval", patience=3)  # fmt: skip
                opt.load_state_dict(saved)
            model(x).float().square().mean().backward()
            opt.step(loss=1.0)
            opt.zero_grad()
        return model

    for a, b in zip(run(split=None).parameters(), run(split=5).parameters()):
        assert torch.equal(a, b)


def test_factored_rest_keeps_two_vectors_per_matrix_and_counts_them():
    model, optimizer, _ = train(steps=4, rest="factored")
    states = optimizer.state_dict()["blockllm"]["rest"]["rule"]
    weight = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert set(states["model.layers.0.mlp.up_proj.weight"]) == {"row", "col", "step"}
    assert states["model.layers.0.mlp.up_proj.weight"]["row"].numel() == weight.shape[0]
    rule_bytes = sum(t.numel() * t.element_size() for s in states.values() for t in s.values())
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))  # fmt: skip
    report = optimizer.memory_report()
    assert report["optimizer_state"] >= adam + rule_bytes
    assert rule_bytes < 0.05 * sum(p.numel() * 4 for p in model.parameters())


def test_always_adam_auto_pins_vectors_and_the_vocabulary_matrices():
    model = tiny_llama()
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.9, rest="sign", always_adam="auto")
    pinned = {optimizer.candidate_names[i] for i in optimizer.selector.candidates.pinned}
    expected = {n for n, p in model.named_parameters() if p.ndim == 1}
    expected |= {"model.embed_tokens.weight", "lm_head.weight"}
    assert pinned == expected
    # Nothing to pin is fine for "auto" (an explicit pattern that matches nothing is an error).
    BlockLLM(nn.Sequential(nn.Linear(4, 4, bias=False)).named_parameters(), always_adam="auto")


def test_the_default_rest_is_the_factored_rule_at_beta2_0_99():
    """0.6's default, ``rest="auto"`` on one process: the factored rule on every matrix."""
    default, _, _ = train(steps=6)
    explicit, _, _ = train(steps=6, rest="factored", factored_beta2=0.99)
    sign, _, _ = train(steps=6, rest="sign")
    for a, b in zip(default.parameters(), explicit.parameters()):
        assert torch.equal(a, b)
    # The rule object's own default is the library's (two literals: config.py is read unimported).
    assert FactoredRest().beta2 == BlockLLMConfig().factored_beta2
    assert max_difference(default, sign) > 0


def test_factored_beta2_sets_the_decay_of_every_factored_rule():
    """The name with ``factored_beta2`` trains as the rule object built with that decay does,
    on the vocabulary (``vocab_rest``) and on the other matrices (``rest``) alike."""
    for rest in ("sign", "factored"):
        by_name, _, _ = train(steps=6, rest=rest, factored_beta2=0.9)
        objects = dict(vocab_rest=FactoredRest(beta2=0.9))
        if rest == "factored":
            objects["rest"] = FactoredRest(beta2=0.9)
        by_object, _, _ = train(steps=6, **{"rest": rest, **objects})
        default, _, _ = train(steps=6, rest=rest)
        for a, b in zip(by_name.parameters(), by_object.parameters()):
            assert torch.equal(a, b)
        assert max_difference(by_name, default) > 0


def reference_factored_directions(grads, beta2=0.999, eps=1e-30):
    """Adafactor without momentum written out plainly: factored EMA of g**2 + eps, RMS clip 1."""
    row = torch.zeros(grads[0].shape[0], dtype=torch.float64)
    col = torch.zeros(grads[0].shape[1], dtype=torch.float64)
    for step, grad in enumerate(grads, start=1):
        g = grad.double()
        squares = g * g + eps
        row = beta2 * row + (1 - beta2) * squares.mean(dim=1)
        col = beta2 * col + (1 - beta2) * squares.mean(dim=0)
        correction = 1 - beta2**step
        v = torch.outer(row / correction, col / correction) / (row / correction).mean()
        update = g / v.sqrt()
        yield update / max(1.0, update.square().mean().sqrt().item())


# (2000, 300): tall enough that the column sums run over several row slices on a CPU.
@pytest.mark.parametrize("beta2", [0.999, 0.9])
@pytest.mark.parametrize("rows, cols", [(50, 8), (2000, 300)])
def test_factored_rest_direction_matches_the_written_out_formula(rows, cols, beta2):
    torch.manual_seed(0)
    # Rows of very different size, as a vocabulary matrix's rare and common tokens have.
    grads = [torch.randn(rows, cols) * torch.logspace(-4, 1, rows)[:, None] for _ in range(5)]
    rule = FactoredRest(beta2=beta2)
    state = rule.init_state(grads[0])
    for grad, expected in zip(grads, reference_factored_directions(grads, beta2)):
        got = rule.direction(grad, state)
        assert got.dtype == grad.dtype and got.shape == grad.shape
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4), (1000, 7), (2000, 300), (40, 70000)])
def test_row_and_column_sums_of_squares_match_the_dense_formulas(shape):
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    expected = matrix.double().square().sum(dim=0)
    rows, got = _sums_of_squares(matrix)
    assert got.dtype == matrix.dtype and got.shape == (shape[1],)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # The row sums come from the same pass.
    assert rows.dtype == matrix.dtype and rows.shape == (shape[0],)
    torch.testing.assert_close(rows.double(), matrix.double().square().sum(dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", [None, "nan", "inf"])
def test_the_sign_fast_path_steps_exactly_as_the_general_path(poison, monkeypatch):
    # Whole fp32 tensors under "sign" take a fast path (the sign in place on the freed
    # gradient, one fused add); the general path must give the same weights bit for bit, and a
    # non-finite gradient must leave its tensor where it was on both.
    from blockllm.optim.rest_step import RestStepper

    def run(fast):
        if not fast:
            monkeypatch.setattr(RestStepper, "_plain_sign", lambda *args: False)
        torch.manual_seed(0)
        model = tiny_llama()
        optimizer = BlockLLM(model.named_parameters(), lr=3e-3, weight_decay=0.0, sparsity=0.9,
                             trigger="interval", patience=2)  # fmt: skip
        target = model.model.layers[0].mlp.up_proj.weight
        poisoned = False
        for step, tokens in enumerate(patterned_batches(6)):
            handle = None
            if poison and step == 4 and "model.layers.0.mlp.up_proj.weight" not in optimizer.selected:
                poisoned = True
                before = target.detach().clone()
                handle = target.register_hook(lambda g: torch.full_like(g, float(poison)))
            model(input_ids=tokens, labels=tokens).loss.backward()
            if handle is not None:
                handle.remove()
            optimizer.step(loss=1.0)
            optimizer.zero_grad(set_to_none=True)
            if handle is not None:
                assert torch.equal(target, before)  # not moved by sign(inf) = 1
        assert poisoned == bool(poison)  # the poisoned tensor was in the rest, as meant
        monkeypatch.undo()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    fast, general = run(True), run(False)
    for name, value in fast.items():
        assert torch.equal(value, general[name]), name


def test_a_bf16_weight_takes_the_factored_rules_fp32_direction():
    # A bf16 weight's rest step is computed in fp32 and rounded once, at the write: the
    # direction is the rule's fp32 one, not rounded to the gradient's bf16 first.
    model, optimizer, rows = _two_linears_after_selection(
        torch.bfloat16, rest="factored", vocab_rest=None, stochastic_rounding=False
    )
    weight = model[1].weight
    before = weight.detach().clone()
    state = copy.deepcopy(optimizer.state_dict()["blockllm"]["rest"]["rule"]["1.weight"])
    grads = []
    weight.register_hook(lambda grad: grads.append(grad.detach().clone()))
    model(torch.randn(4, 3).bfloat16()).float().square().mean().backward()
    optimizer.step(loss=1.0)
    direction = FactoredRest(beta2=0.99).prepare(grads[0], state).dense()
    assert grads[0].dtype == torch.bfloat16 and direction.dtype == torch.float32

    def stepped(direction):
        return before - (direction * (0.1 * 0.3)).add_(before, alpha=0.2 * 0.1).bfloat16()

    rest = torch.ones(200, dtype=torch.bool)
    rest[rows] = False
    assert torch.equal(weight.detach()[rest], stepped(direction)[rest])
    # The old arithmetic (the direction rounded to bf16 first) lands elsewhere.
    assert not torch.equal(weight.detach()[rest], stepped(direction.bfloat16().float())[rest])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_the_sliced_write_equals_the_whole_tensor_write(dtype, stochastic, contiguous):
    # A dense rest step writes weight - update slice by slice (several slices here), so that
    # bf16 rounding's fp32 temporaries stay slice-sized; bit for bit the whole-tensor write,
    # random bits included (a CPU generator draws one stream however it is cut).
    from blockllm.optim.rest_step import _WRITE_SLICE_ELEMENTS, _subtract_in_slices_
    from blockllm.optim.rounding import stochastic_round_to_bf16

    if stochastic and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 weights")
    torch.manual_seed(0)
    weight = torch.randn(3 * _WRITE_SLICE_ELEMENTS // 64 + 5, 64).to(dtype)
    update = torch.randn(weight.shape) * 1e-3
    if not contiguous:
        weight, update = weight.t(), update.t()
    if stochastic:
        expected = stochastic_round_to_bf16(weight.float() - update, torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)
    else:
        expected, generator = weight - update.to(dtype), None
    _subtract_in_slices_(weight, update, generator)
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("finite", [True, False])
def test_the_sliced_sign_step_equals_the_whole_tensor_step(finite):
    # On a CPU the sign step runs slice by slice (several slices here); it must give the
    # whole-tensor arithmetic bit for bit, and no step at all for a non-finite gradient.
    from blockllm.optim.rest_step import _SIGN_SLICE_ELEMENTS, _sign_step_

    torch.manual_seed(0)
    grad = torch.randn(3 * _SIGN_SLICE_ELEMENTS + 17)
    weight = torch.randn_like(grad)
    expected = weight + (-3e-4) * torch.sign(grad) if finite else weight.clone()
    _sign_step_(weight, grad.clone(), torch.tensor(finite), -3e-4)
    assert torch.equal(weight, expected)


def _sparse_rows_gradients(live, count=4, shape=(2000, 300)):
    """Gradients whose rows are all zero but a ``live`` share (an embedding's, batch tokens)."""
    torch.manual_seed(0)
    grads = []
    for _ in range(count):
        grad = torch.randn(shape) * torch.logspace(-4, 1, shape[0])[:, None]
        grad[torch.rand(shape[0]) > live] = 0.0
        grads.append(grad)
    return grads


@pytest.mark.parametrize("live", [0.1, 0.9])
def test_the_factored_step_on_live_rows_is_the_dense_direction_on_them(live):
    # Writing the direction out on the live rows only: the statistics are updated as for the
    # dense direction, the rows are those with a nonzero gradient, the values the dense ones
    # (up to the clip's summation order), and the dense direction is zero elsewhere.
    grads = _sparse_rows_gradients(live)
    dense_rule, rows_rule = FactoredRest(), FactoredRest()
    dense_state, rows_state = dense_rule.init_state(grads[0]), rows_rule.init_state(grads[0])
    for grad in grads:
        expected = dense_rule.direction(grad, dense_state)
        prepared = rows_rule.prepare(grad, rows_state)
        for key in dense_state:
            assert torch.equal(dense_state[key], rows_state[key]), key
        torch.testing.assert_close(prepared.dense(), expected, rtol=0, atol=0)
        if live > 0.5:
            assert prepared.live_rows() is None  # most rows live: the dense path is cheaper
            continue
        rows, values = prepared.live_rows()
        assert torch.equal(rows, grad.abs().sum(dim=1).nonzero().squeeze(1))
        untouched = torch.ones(grad.shape[0], dtype=torch.bool)
        untouched[rows] = False
        assert not expected[untouched].any()
        torch.testing.assert_close(values, expected[rows], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: the direction's RMS exceeds 1, clipped
def test_the_in_place_factored_step_is_the_dense_step(scale, decay):
    # No full-size direction: the weight is stepped slice by slice, the same arithmetic per
    # entry as subtracting the written-out direction, and the clip's sum over the same slices.
    grads = _sparse_rows_gradients(1.0, count=3)
    rule = FactoredRest()
    state = rule.init_state(grads[0])
    weight = torch.randn(grads[0].shape)
    for step, grad in enumerate(grads):
        twin_state = {key: value.clone() for key, value in state.items()}
        expected_direction = rule.prepare(grad * (scale if step else 1.0), twin_state).dense()
        # The general path's arithmetic (RestStepper._step): scale, add the decay, subtract.
        expected = weight - expected_direction.mul_(3e-3).add_(weight, alpha=decay * 3e-3)
        rule.prepare(grad * (scale if step else 1.0), state).apply_(weight, 3e-3, decay * 3e-3)
        assert torch.equal(weight, expected)


@pytest.mark.parametrize("decay", [0.0, 1e-2])
@pytest.mark.parametrize("live", [0.2, 1.0])
@pytest.mark.parametrize("selection", ["none", "rows", "rows+extra", "coordinates"])
def test_the_factored_step_leaves_the_selected_coordinates_alone(selection, live, decay):
    # Adam owns the selected coordinates: the in-place and the live-rows steps must move
    # every other entry as the dense step does and these not at all.
    from blockllm.optim.rest_step import _step_factored_
    from blockllm.selection.coordinates import RowCoordinates, fill_

    grad = _sparse_rows_gradients(live, count=1, shape=(50, 8))[0]
    live_rows = grad.abs().sum(dim=1).nonzero().squeeze(1)
    selected = {
        "none": None,
        "rows": RowCoordinates(torch.stack([live_rows[0], live_rows[-1], torch.tensor(7)]).sort().values.int(),
                               torch.zeros(0, dtype=torch.int32), 8),
        "rows+extra": RowCoordinates(live_rows[:1].int(), torch.tensor([int(live_rows[1]) * 8 + 3, 100], dtype=torch.int32), 8),
        "coordinates": torch.tensor([0, int(live_rows[2]) * 8 + 1, 399], dtype=torch.int32),
    }[selection]  # fmt: skip
    rule = FactoredRest()
    weight = torch.randn(50, 8)
    state = rule.init_state(grad)
    update = rule.prepare(grad, {k: v.clone() for k, v in state.items()}).dense().mul_(3e-3)
    update.add_(weight, alpha=decay * 3e-3)
    if selected is not None:
        fill_(update, selected, 0.0)
    expected = weight - update
    _step_factored_(weight, rule.prepare(grad, state), selected, 3e-3, decay * 3e-3)
    torch.testing.assert_close(weight, expected, rtol=1e-6, atol=0.0)
    if selected is not None:
        flat = selected.long()
        assert torch.equal(weight.view(-1)[flat], expected.view(-1)[flat])


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_the_factored_rule_in_place_trains_as_the_general_path(monkeypatch, decay):
    # Tokens 0-127 of a 1,024-token vocabulary: the embedding's other rows get a zero gradient,
    # so without decay it is stepped on its live rows only, and the head in place. The weights
    # must come out as the general path's (up to the clip's summation order); unused rows of
    # the embedding never move unless they decay.
    in_place, general = (
        _train_factored(monkeypatch, in_place, decay, torch.float32) for in_place in (True, False)
    )
    for (name, p), q in zip(in_place.named_parameters(), general.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("stochastic", [True, False])
def test_the_factored_rule_in_place_on_bf16_weights_is_the_general_path(monkeypatch, decay, stochastic):
    # bf16 weights (`--precision bf16-pure`) on a CPU: the in-place step widens the gradient
    # slice by slice and rounds each slice of the weight as the dense path rounds the whole
    # (the same random bits: one CPU stream, drawn in the same order), so bit for bit.
    in_place, general = (
        _train_factored(monkeypatch, in_place, decay, torch.bfloat16, stochastic_rounding=stochastic)
        for in_place in (True, False)
    )
    for (name, p), q in zip(in_place.named_parameters(), general.parameters()):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, q), name


def _twelve_steps(dtype, **options):
    """A tiny Llama (vocabulary 1,024) in ``dtype``, its BlockLLM at the default rest rule after
    12 clipped steps with a reselection every 4, and its embedding as it started."""
    model = tiny_llama(vocab=1024).to(dtype)
    start = model.model.embed_tokens.weight.detach().clone()
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, trigger="interval",
                         patience=4, fused=False, **options)  # fmt: skip
    for tokens in patterned_batches(12):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step(loss=1.0)
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, start


def _train_factored(monkeypatch, in_place, decay, dtype, **options):
    """A tiny Llama trained 12 steps with the default (factored) rest, in place or not."""
    from blockllm.optim import rest_step

    stepped_in_place = []
    if in_place:
        real = rest_step._step_factored_

        def spy(weight, *args):
            stepped_in_place.append(weight.dtype)
            return real(weight, *args)

        monkeypatch.setattr(rest_step, "_step_factored_", spy)
    else:
        monkeypatch.setattr(rest_step.RestStepper, "_in_place", lambda *args: False)
    model, _, start = _twelve_steps(dtype, weight_decay=decay, **options)
    monkeypatch.undo()
    assert bool(stepped_in_place) == in_place and set(stepped_in_place) <= {dtype}
    unused = model.model.embed_tokens.weight[128:]
    if dtype == torch.float32 or options.get("stochastic_rounding"):
        assert torch.equal(unused, start[128:]) == (decay == 0.0)
    else:  # round to nearest: a decay of lr * 0.1 per step is below half a bf16 unit
        assert torch.equal(unused, start[128:])
    return model


@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("live", [0.2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shortlisted_tensor_in_place_defers_the_general_paths_step(monkeypatch, live, decay, dtype):
    # On a selection step a shortlisted tensor steps all but its kept coordinates at once and
    # hands back their step for later: in place (no full-size direction) exactly as the
    # general path, which writes the direction out and gathers it.
    from blockllm.distributed.base import SingleProcess
    from blockllm.optim.rest_step import RestStepper
    from blockllm.selection.coordinates import RowCoordinates

    grad = _sparse_rows_gradients(live, count=1, shape=(300, 40))[0]
    kept = RowCoordinates(torch.tensor([3, 50, 299], dtype=torch.int32), torch.tensor([41, 4000], dtype=torch.int32), 40)

    def release(in_place):
        if not in_place:
            monkeypatch.setattr(RestStepper, "_in_place", lambda *args: False)
        torch.manual_seed(1)
        weight = torch.nn.Parameter(torch.randn(300, 40).to(dtype))
        stepper = RestStepper(
            FactoredRest(), lr_scale=1.0, weight_decay=decay, params=[weight],
            groups=[{"lr": 3e-3, "weight_decay": decay}], comm=SingleProcess(), in_backward=True,
            held=lambda: False,
        )  # fmt: skip
        weight.grad = grad.to(dtype)
        deferred = stepper.release_outside(0, kept)
        monkeypatch.undo()
        assert weight.grad is None
        return weight.detach(), deferred

    (weight, deferred), (expected_weight, expected_deferred) = release(True), release(False)
    assert torch.equal(deferred, expected_deferred)
    if dtype == torch.bfloat16:  # the same slices' sums and random bits: bit for bit
        assert torch.equal(weight, expected_weight)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-6, atol=0.0)
    assert torch.equal(weight.view(-1)[kept.long()], expected_weight.view(-1)[kept.long()])


@pytest.mark.parametrize("stochastic", [False, True])
def test_a_deferred_step_on_bf16_rows_rounds_each_kept_coordinate(stochastic):
    # A bf16 weight's deferred step goes by rows as an fp32 weight's does (no flat int64 index
    # of every kept coordinate): each kept coordinate Adam did not pick lands on a bf16
    # neighbour of weight - step (the nearest without stochastic rounding, as the flat path
    # rounds), Adam's picks and every other coordinate stay as they were.
    from blockllm.distributed.base import SingleProcess
    from blockllm.optim.rest_step import RestStepper
    from blockllm.selection.coordinates import RowCoordinates

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300, 40).bfloat16())
    before = weight.detach().clone()
    stepper = RestStepper(
        FactoredRest(), lr_scale=1.0, weight_decay=0.0, params=[weight],
        groups=[{"lr": 1e-3, "weight_decay": 0.0}], comm=SingleProcess(), in_backward=True,
        held=lambda: False, stochastic_rounding=stochastic,
    )  # fmt: skip
    kept = RowCoordinates(torch.tensor([3, 50, 299], dtype=torch.int32), torch.tensor([41, 4000], dtype=torch.int32), 40)
    picked = RowCoordinates(torch.tensor([50], dtype=torch.int32), torch.tensor([3 * 40 + 7], dtype=torch.int32), 40)
    step = torch.randn(kept.numel()) * 1e-3
    stepper.apply_deferred(0, kept, step, picked)
    flat, old = weight.detach().view(-1), before.view(-1)
    moved = torch.zeros(flat.numel(), dtype=torch.bool)
    moved[kept.long()] = True
    moved[picked.long()] = False
    assert torch.equal(flat[~moved], old[~moved])
    full_step = torch.zeros(flat.numel()).index_put_((kept.long(),), step)
    exact = (old.float() - full_step)[moved]
    got = flat[moved].float()
    if not stochastic:
        assert torch.equal(flat[moved], (old - full_step.bfloat16())[moved])
    # A bf16 neighbour of the exact value: within one bf16 unit of it, on the right side.
    unit = exact.abs() * 2.0**-7
    assert bool(((got - exact).abs() <= unit).all())


def test_low_precision_norms_take_no_fp32_copy_of_the_whole_tensor():
    # vector_norm(x, dtype=float32) widens all of a bf16 x first; the norms the selection and
    # the clip take are reduced a slice at a time instead, to the same values.
    from blockllm.selection import scorers
    from tests.app.planning.test_planning_measured import peak_allocated

    torch.manual_seed(0)
    grad = torch.randn(3 * scorers._NORM_SLICE_ELEMENTS // 512 + 7, 512).bfloat16()
    wide = grad.float()
    # The same sum of squares in another order, against fp64: fp32 rounding over 12.6M squares
    # is a few 1e-4 (the whole tensor's own fp32 norm is 2.7e-4 off here), so 1e-3, which a
    # slice left out or counted twice (a third of the squares) would miss by far.
    exact = torch.linalg.vector_norm(wide.double()).float()
    torch.testing.assert_close(scorers.grad_norm(grad), exact, rtol=1e-3, atol=0)
    assert torch.equal(scorers.row_norms(grad), torch.linalg.vector_norm(wide, dim=1))
    whole = grad.numel() * 4
    assert peak_allocated(lambda: scorers.grad_norm(grad)) < whole / 2
    assert peak_allocated(lambda: scorers.row_norms(grad)) < whole / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_accelerator_form_of_the_factored_rule_is_the_cpu_form(monkeypatch, dtype):
    # An accelerator reduces in whole-tensor kernels (a bf16 matrix in large slices, widened
    # to fp32 a slice at a time); run here on a CPU by claiming every tensor is on one. Same
    # statistics and direction up to summation order, for one process and for a shard.
    from blockllm.selection import rest_rules

    torch.manual_seed(0)
    grads = [(torch.randn(3000, 700) * torch.rand(3000, 1)).to(dtype) for _ in range(3)]
    row_weights = torch.rand(3000)

    def directions(accelerator):
        if accelerator:
            monkeypatch.setattr(rest_rules, "_on_accelerator", lambda tensor: True)
            monkeypatch.setattr(rest_rules, "_ACCELERATOR_SLICE_ELEMENTS", 1 << 19)  # 3 slices
        rule = FactoredRest(beta2=0.9)
        state = rule.init_state(grads[0])
        out = [rule.direction(grad, state) for grad in grads]
        weighted = rest_rules._weighted_column_sums(grads[0], row_weights)
        monkeypatch.undo()
        return out, state, weighted

    (cpu, cpu_state, cpu_weighted), (accelerator, state, weighted) = directions(False), directions(True)
    for key in ("row", "col"):
        torch.testing.assert_close(state[key], cpu_state[key], rtol=1e-5, atol=0)
    # fp32: a few 1e-5 (the statistics' sums); bf16: the direction is returned in bf16, where
    # that difference now and then rounds to the neighbouring value (one unit, 2**-7).
    tolerance = 1e-4 if dtype == torch.float32 else 2.0**-7
    for got, expected in zip(accelerator, cpu):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=1e-6)
    torch.testing.assert_close(weighted, cpu_weighted, rtol=1e-5, atol=0)


class _HostRead(AssertionError):
    pass


def _refuse_host_reads(monkeypatch):
    """Every way a tensor's value reaches the host (on a GPU: a wait for the device) raises."""

    def refuse(*args, **kwargs):
        raise _HostRead("a host read in the accelerator form of the rest step")

    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: the direction's RMS exceeds 1, clipped
@pytest.mark.parametrize("kept", [False, True])  # True: a shortlisted tensor's deferred step
@pytest.mark.parametrize("poison", [None, "nan"])
def test_the_accelerator_steps_the_factored_rule_in_place_without_host_reads(
    monkeypatch, dtype, decay, scale, kept, poison
):
    # On an accelerator the factored step is taken in place as on a CPU (no fp32 direction of
    # the whole matrix at the backward's peak: 2.1 GB for an 8B Llama's embedding) and reads
    # nothing on the host: the clip divides by its RMS clamped at 1, a non-finite gradient is
    # masked to a zero step, no live rows are looked for. Run here by claiming every tensor is
    # on an accelerator, in 4 slices; compared with the CPU's dense path (the general one).
    from blockllm.distributed.base import SingleProcess
    from blockllm.optim.rest_step import RestStepper
    from blockllm.selection import rest_rules
    from blockllm.selection.coordinates import RowCoordinates

    torch.manual_seed(0)
    grads = [torch.randn(1000, 64) * torch.rand(1000, 1) * scale for _ in range(3)]
    if poison:
        grads[1][7, 3] = float(poison)
    selected = RowCoordinates(torch.tensor([3, 500, 999], dtype=torch.int32), torch.tensor([70, 4000], dtype=torch.int32), 64)

    def train(accelerator):
        if accelerator:
            monkeypatch.setattr(rest_rules, "_on_accelerator", lambda tensor: True)
            monkeypatch.setattr(rest_rules, "_ACCELERATOR_SLICE_ELEMENTS", 16_000)  # 4 slices
            monkeypatch.setattr(rest_rules.FactoredStep, "dense", None)  # never built whole
        else:
            monkeypatch.setattr(RestStepper, "_in_place", lambda *args: False)
        torch.manual_seed(1)
        weight = torch.nn.Parameter(torch.randn(1000, 64).to(dtype))
        stepper = RestStepper(
            FactoredRest(beta2=0.9), lr_scale=1.0, weight_decay=decay, params=[weight],
            groups=[{"lr": 3e-3, "weight_decay": decay}], comm=SingleProcess(), in_backward=True,
            held=lambda: False, stochastic_rounding=False,
        )  # fmt: skip
        deferred = []
        for grad in grads:
            weight.grad = grad.to(dtype)
            with monkeypatch.context() as reads:
                if accelerator:
                    _refuse_host_reads(reads)
                if kept:
                    deferred.append(stepper.release_outside(0, selected))
                else:
                    stepper.release(0)
            stepper.end_step()
            assert weight.grad is None
        state = stepper.rule_states[0]
        monkeypatch.undo()
        return weight.detach(), deferred, state

    (weight, deferred, state), (expected, expected_deferred, expected_state) = train(True), train(False)
    assert torch.isfinite(weight).all() and torch.isfinite(state["row"]).all()
    # The statistics' sums and the clip's sum of squares are taken in another order: a few
    # 1e-6 in fp32; in bf16 that now and then rounds a weight to its neighbour (one unit).
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2.0**-7, atol=0)
    torch.testing.assert_close(weight, expected, **tolerance)
    for key in ("row", "col", "step"):
        torch.testing.assert_close(state[key], expected_state[key], rtol=1e-5, atol=0)
    for got, want in zip(deferred, expected_deferred):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    if poison:  # the poisoned step moved nothing, deferred coordinates included
        assert not deferred or not deferred[1].any()
    if kept:  # the kept coordinates wait for their deferred step
        flat = selected.long()
        start = torch.randn(1000, 64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(weight.view(-1)[flat], start.to(dtype).view(-1)[flat])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_in_the_accelerators_form_is_training_in_the_cpus(monkeypatch, dtype):
    # The whole optimizer (hooks, selection steps with shortlists and deferred steps, clipping,
    # decay) with the factored rule's accelerator form, against the CPU's: 12 steps of a tiny
    # Llama come out the same up to the summation order of the statistics and the clip.
    from blockllm.selection import rest_rules

    def train(accelerator):
        if accelerator:
            monkeypatch.setattr(rest_rules, "_on_accelerator", lambda tensor: True)
            monkeypatch.setattr(rest_rules, "_ACCELERATOR_SLICE_ELEMENTS", 1 << 16)  # 4 on the head
            monkeypatch.setattr(rest_rules.FactoredStep, "dense", None)  # never built whole
        torch.manual_seed(0)
        model, optimizer, _ = _twelve_steps(dtype, weight_decay=0.1, stochastic_rounding=False)
        monkeypatch.undo()
        assert optimizer.num_reselections >= 2
        return model

    accelerator, cpu = train(True), train(False)
    # Measured here: 4e-7 at most in fp32 (weights moved by up to 0.07), bf16 identical; one
    # bf16 unit allowed for a neighbouring rounding elsewhere.
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2.0**-7, atol=0.0)
    for (name, p), q in zip(accelerator.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(p, q, **tolerance, msg=name)
