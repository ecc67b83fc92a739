"""At sparsity 0, BlockLLM is torch.optim.AdamW, step for step and bit for bit."""

import copy

import pytest
import torch

from blockllm import BlockLLM
from tests.optim.helpers import TinyNet, make_batches, train_steps


def grouped(model, named: bool):
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    if named:
        return [
            {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": 0.1},
            {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay],
             "weight_decay": 0.0, "lr": 3e-3},
        ]  # fmt: skip
    return [
        {"params": [p for _, p in decay], "weight_decay": 0.1},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "lr": 3e-3},
    ]


@pytest.mark.parametrize(
    "impl",
    [dict(fused=True), dict(foreach=False, fused=False), dict(foreach=True)],
    ids=["fused", "forloop", "foreach"],
)
def test_sparsity_zero_equals_adamw_bitwise(impl):
    model = TinyNet()
    reference = copy.deepcopy(model)
    ours = BlockLLM(grouped(model, named=True), lr=1e-2, sparsity=0.0, **impl)
    theirs = torch.optim.AdamW(grouped(reference, named=False), lr=1e-2, **impl)
    sched_ours = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=[1e-2, 3e-3], total_steps=30)
    sched_theirs = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=[1e-2, 3e-3], total_steps=30)
    batches = make_batches(30)
    train_steps(model, ours, batches, scheduler=sched_ours)
    train_steps(reference, theirs, batches, scheduler=sched_theirs)
    for (name, mine), other in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(mine, other), name
    for mine, other in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours.state[mine]["exp_avg"], theirs.state[other]["exp_avg"])
        assert torch.equal(ours.state[mine]["exp_avg_sq"], theirs.state[other]["exp_avg_sq"])
    assert ours.num_reselections == 0
    assert ours.num_selected == ours.budget == sum(p.numel() for p in model.parameters())


def test_default_implementation_matches_fused_adamw():
    model = TinyNet()
    reference = copy.deepcopy(model)
    ours = BlockLLM(model.named_parameters(), lr=5e-3, weight_decay=0.05, sparsity=0.0)
    theirs = torch.optim.AdamW(reference.parameters(), lr=5e-3, weight_decay=0.05, fused=True)
    batches = make_batches(10)
    train_steps(model, ours, batches)
    train_steps(reference, theirs, batches)
    for mine, other in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, other)


def test_add_param_group_at_sparsity_zero_trains_new_tensors_like_adamw():
    model = TinyNet()
    reference = copy.deepcopy(model)
    head = ["head.weight", "head.bias"]
    body = [(n, p) for n, p in model.named_parameters() if n not in head]
    ours = BlockLLM(body, lr=1e-2, sparsity=0.0, fused=True)
    theirs = torch.optim.AdamW(
        [p for n, p in reference.named_parameters() if n not in head],
        lr=1e-2,
        weight_decay=0.0,  # torch's AdamW defaults to 0.01, BlockLLM to 0.0
        fused=True,
    )
    batches = make_batches(12)
    train_steps(model, ours, batches[:6])
    train_steps(reference, theirs, batches[:6])
    ours.add_param_group({"params": [model.head.weight, model.head.bias], "names": head, "lr": 2e-2})
    theirs.add_param_group({"params": [reference.head.weight, reference.head.bias], "lr": 2e-2})
    train_steps(model, ours, batches[6:])
    train_steps(reference, theirs, batches[6:])
    for mine, other in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, other)


def test_clip_grad_norm_and_zero_grad_behave_as_for_adamw():
    model = TinyNet()
    reference = copy.deepcopy(model)
    ours = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.0, fused=True)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    for batch in make_batches(8):
        for net, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            opt.step()
    for mine, other in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, other)
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
