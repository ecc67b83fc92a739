"""What is selected, what may change, and when the selection is renewed."""

import ast
import logging
import math

import pytest
import torch

from blockllm import BlockLLM
from blockllm.selection.packing import budget_for
from tests.optim.helpers import TinyNet, loss_of, make_batches, snapshot, train_steps


def test_budget_is_floor_of_decimal_fraction():
    model = TinyNet()
    total = sum(p.numel() for p in model.parameters())
    opt = BlockLLM(model.named_parameters(), sparsity=0.9)
    assert opt.budget == math.floor(total / 10) == budget_for(0.9, total)
    assert budget_for(0.9, 100) == 10  # (1 - 0.9) * 100 is 9.999... in binary floats


def test_first_selection_happens_at_first_step_and_that_step_updates():
    model = TinyNet()
    # rest="none": only the selected block may move (the default moves every tensor).
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, patience=1000, rest="none")
    assert opt.selected == [] and opt.selection_pending
    before = snapshot(model)
    loss = loss_of(model, make_batches(1)[0])
    loss.backward()
    opt.step(loss=loss)
    assert opt.num_selections == 1 and opt.num_reselections == 0
    assert opt.selected and opt.num_selected == opt.budget
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(opt.selected)  # the authors' code skips the first update; we do not


def test_debug_log_names_each_selected_tensor_with_its_coordinates(caplog):
    model = TinyNet()
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, max_tensor_share=0.25)
    caplog.set_level(logging.DEBUG, logger="blockllm")
    loss = loss_of(model, make_batches(1)[0])
    loss.backward()
    opt.step(loss=loss)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("selected (")]
    counts = ast.literal_eval(line.split("): ", 1)[1])
    assert list(counts) == opt.selected
    assert sum(counts.values()) == opt.num_selected == opt.budget
    assert all(0 < count <= dict(model.named_parameters())[name].numel() for name, count in counts.items())


@pytest.mark.parametrize("share, partial", [(1.0, "coordinates"), (0.25, "rows"), (0.25, "coordinates")])
def test_selection_follows_gradient_norms_and_fills_budget_exactly(share, partial):
    model = TinyNet(width=32)
    names = [n for n, _ in model.named_parameters()]
    batch = make_batches(1)[0]
    loss_of(model, batch).backward()
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    opt = BlockLLM(
        model.named_parameters(), sparsity=0.8, patience=1000, lr=1e-3, max_tensor_share=share,
        partial=partial,
    )  # fmt: skip
    loss = loss_of(model, batch)
    loss.backward()
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    # The documented rule, written out independently of the packer: in score order each tensor
    # takes min(size, cap, budget left); the first that cannot have min(size, cap) ends it.
    cap = max(1, math.floor(share * opt.budget))
    assert sum(min(size, cap) for size in sizes.values()) >= opt.budget  # the plain cap holds
    left, whole, partial_counts = opt.budget, [], {}
    for name in sorted(names, key=lambda n: -norms[n]):
        wanted = min(sizes[name], cap)
        if wanted > left:
            if left > 0:
                partial_counts[name] = left
            break
        if wanted == sizes[name]:
            whole.append(name)
        else:
            partial_counts[name] = wanted
        left -= wanted
    opt.step(loss=loss)
    assert set(opt.selected) == set(whole) | set(partial_counts)
    assert opt.num_selected == opt.budget
    for name, count in partial_counts.items():
        chosen = opt.coordinates(name).long()
        assert chosen.numel() == count
        grad = grads[name]
        mask = torch.zeros(grad.numel(), dtype=torch.bool)
        mask[chosen] = True
        if partial == "rows" and grad.ndim == 2:
            # whole rows by row norm: every fully chosen row's norm >= every untouched row's
            row_size = grad.shape[1]
            taken = mask.view(grad.shape).sum(1)
            norms_by_row = grad.norm(dim=1)
            full, untouched = taken == row_size, taken == 0
            assert int(full.sum()) == count // row_size
            if full.any() and untouched.any():
                assert norms_by_row[full].min() >= norms_by_row[untouched].max()
        else:
            # every chosen coordinate is at least as large as every coordinate left out
            magnitude = grad.abs().reshape(-1)
            assert magnitude[mask].min() >= magnitude[~mask].max()


@pytest.mark.parametrize("selection", ["tensor", "mask"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_frozen_tensors_unchanged_and_at_most_k_coordinates_change(selection, sparsity):
    model = TinyNet(width=24)
    opt = BlockLLM(
        model.named_parameters(), lr=1e-2, weight_decay=0.1, sparsity=sparsity,
        trigger="interval", patience=3, selection=selection, rest="none",
    )  # fmt: skip  (rest="none": the frozen-until-selected rule this test is about)
    for batch in make_batches(20):
        before = snapshot(model)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        opt.step(loss=loss)
        after = snapshot(model)
        changed = sum(int((before[n] != after[n]).sum()) for n in before)
        assert 0 < changed <= opt.budget
        selected = set(opt.selected)
        for name, param in model.named_parameters():
            if name not in selected:
                assert torch.equal(before[name], after[name]), name
                assert param not in opt.state or not opt.state[param]
                assert param.grad is None
                assert not param.requires_grad or opt.selection_pending
    assert opt.num_reselections >= 5


def test_mask_mode_updates_exactly_k_coordinates_inside_a_score_prefix():
    model = TinyNet(width=24)
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, selection="mask", patience=1000)
    batch = make_batches(1)[0]
    loss = loss_of(model, batch)
    loss.backward()
    opt.step(loss=loss)
    assert opt.num_selected == opt.budget


def test_loss_trigger_fires_on_plateau_and_not_while_loss_falls():
    model = TinyNet()
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, patience=5)
    batch = make_batches(1)[0]

    def run(losses):
        for value in losses:
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step(loss=value)

    run([10.0])  # the first selection
    run([9.0 - 0.1 * i for i in range(30)])  # always below the moving average
    assert opt.num_reselections == 0
    run([5.0] * 5)  # flat: not below the mean of the last 5 -> fires on the 5th
    assert opt.selection_pending
    run([5.0])  # the selection step
    assert opt.num_reselections == 1


def test_interval_trigger_reselects_every_patience_steps():
    model = TinyNet()
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, trigger="interval", patience=4)
    train_steps(model, opt, make_batches(17), pass_loss=False)
    # first selection at step 1, then every 4 steps: 5, 9, 13, 17
    assert opt.num_selections == 5 and opt.num_reselections == 4


def test_plateau_forever_never_thrashes():
    model = TinyNet()
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, patience=10)
    batch = make_batches(1)[0]
    selection_steps = []
    for step in range(1, 102):
        opt.zero_grad()
        loss_of(model, batch).backward()
        before = opt.num_selections
        opt.step(loss=1.0)
        if opt.num_selections > before:
            selection_steps.append(step)
    # a flat loss fires as soon as allowed, and never sooner than `patience` steps apart
    assert selection_steps == list(range(1, 102, 10))


def test_visit_counts_spread_the_selection():
    def distinct_tensors(visit_penalty):
        model = TinyNet(width=16, depth=4)
        opt = BlockLLM(
            model.named_parameters(), sparsity=0.9, trigger="interval", patience=1,
            visit_penalty=visit_penalty, lr=1e-3,
        )  # fmt: skip
        seen = set()
        batch = make_batches(1)[0]
        for _ in range(12):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            opt.step(loss=loss)
            seen.update(opt.selected)
        return seen, opt

    with_visits, opt = distinct_tensors(True)
    without_visits, _ = distinct_tensors(False)
    assert len(with_visits) > len(without_visits)
    assert sum(opt.visit_counts.values()) >= 12


def test_random_scores_are_reproducible_from_the_seed():
    def picks(seed):
        model = TinyNet()
        opt = BlockLLM(model.named_parameters(), sparsity=0.9, score="random", seed=seed,
                       trigger="interval", patience=2)  # fmt: skip
        history = []
        for batch in make_batches(8):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            opt.step(loss=loss)
            history.append(tuple(opt.selected))
        return history

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)


def test_selection_never_holds_a_full_model_gradient():
    model = TinyNet(vocab=512, width=64, depth=6)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = BlockLLM(model.named_parameters(), sparsity=0.95, trigger="interval", patience=1)
    peak = 0
    for batch in make_batches(6, vocab=512):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        peak = max(peak, opt.memory_report()["grads"])
        opt.step(loss=loss)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert opt.peak_selection_grad_bytes <= opt.budget * 4 + largest
    assert peak <= opt.budget * 4 + largest < full


def test_include_and_exclude_restrict_candidates_and_freeze_the_rest():
    model = TinyNet()
    opt = BlockLLM(model.named_parameters(), sparsity=0.5, exclude=["embed.weight", ".bias"])
    assert "embed.weight" not in opt.candidate_names
    assert not any(n.endswith(".bias") for n in opt.candidate_names)
    assert not model.embed.weight.requires_grad and not model.head.bias.requires_grad
    opt = BlockLLM(TinyNet().named_parameters(), sparsity=0.5, include=r"layers\.\d+\.weight")
    assert opt.candidate_names == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]


def test_tied_tensor_is_one_block():
    model = TinyNet(vocab=5, width=16, classes=5)
    model.head.weight = model.embed.weight  # tied: same tensor, two names
    named = list(model.named_parameters(remove_duplicate=False))
    opt = BlockLLM(named, sparsity=0.5, exclude=["head.weight"])
    # excluding the alias excludes the tensor
    assert "embed.weight" not in opt.candidate_names
    model = TinyNet(vocab=5, width=16, classes=5)
    model.head.weight = model.embed.weight
    opt = BlockLLM(list(model.named_parameters(remove_duplicate=False)), sparsity=0.5)
    total = sum(p.numel() for p in model.parameters())  # parameters() counts tied once
    assert opt.budget == math.floor(total * 0.5)
    assert opt.candidate_names.count("embed.weight") == 1 and "head.weight" not in opt.candidate_names


def test_unused_parameter_is_never_selected_and_never_crashes():
    model = TinyNet()
    unused = torch.nn.Parameter(torch.randn(4))
    named = list(model.named_parameters()) + [("unused", unused)]
    opt = BlockLLM(named, sparsity=0.5, trigger="interval", patience=2)
    train_steps(model, opt, make_batches(6))
    assert "unused" not in opt.selected


def test_second_optimizer_takes_over_the_hooks():
    model = TinyNet()
    first = BlockLLM(model.named_parameters(), sparsity=0.9)
    second = BlockLLM(model.named_parameters(), sparsity=0.9)
    batch = make_batches(1)[0]
    loss = loss_of(model, batch)
    loss.backward()
    second.step(loss=loss)
    assert second.num_selected == second.budget
    assert first.num_selections == 0


def test_reentrant_checkpointing_scores_every_segment():
    """Inner backward passes of reentrant checkpointing must not end the scoring early."""
    from torch.utils.checkpoint import checkpoint

    class TwoSegments(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x, reentrant):
            x = checkpoint(self.a, x.requires_grad_(), use_reentrant=reentrant)
            return checkpoint(self.b, x, use_reentrant=reentrant)

    for reentrant in (False, True):
        torch.manual_seed(0)
        net = TwoSegments()
        opt = BlockLLM(net.named_parameters(), sparsity=0.25)  # budget 108 of 144
        loss = net(torch.randn(4, 8), reentrant).square().mean()
        loss.backward()
        opt.step(loss=loss)
        assert opt.num_selected == opt.budget == 108, reentrant
        assert "a.weight" in opt.selected


def test_cyclic_order_sweeps_from_the_output_down_and_resumes_where_it_stopped():
    def stack():
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Linear(8, 8, bias=False) for _ in range(8)))

    def run(model, opt, steps):
        picked = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model(torch.randn(4, 8)).square().mean()
            loss.backward()
            opt.step(loss=loss)
            picked.append(sorted(int(name.split(".")[0]) for name in opt.selected))
        return picked

    # Eight equal tensors and a budget of two: each selection takes the next two of the sweep,
    # whatever their gradients, and the ninth selection starts a new sweep at the output.
    kwargs = dict(sparsity=0.75, score="cyclic", trigger="interval", patience=1,
                  max_tensor_share=1.0, lr=1e-3)  # fmt: skip
    model = stack()
    opt = BlockLLM(model.named_parameters(), **kwargs)
    assert run(model, opt, 5) == [[6, 7], [4, 5], [2, 3], [0, 1], [6, 7]]
    assert set(opt.visit_counts.values()) == {1, 2}

    # The sweep's place lives in the visit counts, so a resumed optimizer carries on.
    model = stack()
    opt = BlockLLM(model.named_parameters(), **kwargs)
    run(model, opt, 2)
    saved = opt.state_dict()
    resumed = BlockLLM(model.named_parameters(), **kwargs)
    resumed.load_state_dict(saved)
    assert run(model, resumed, 2) == [[2, 3], [0, 1]]
