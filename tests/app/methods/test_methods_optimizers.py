import pytest
import torch
from torch import nn

from blockllm import BlockLLM
from blockllm.app.methods import (
    OPTIMIZERS,
    OptimizerSpec,
    get_optimizer_spec,
    register_optimizer,
)
from blockllm.app.training import RunConfig
from blockllm.parameter_groups import param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_registry_holds_the_baseline_and_blockllm():
    assert {"adamw", "blockllm"} <= set(OPTIMIZERS)
    assert get_optimizer_spec("blockllm").takes_loss
    assert not get_optimizer_spec("adamw").takes_loss


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"Invalid optimizer: 'sgd' \(choose from 'adamw', 'blockllm'"
    ):
        get_optimizer_spec("sgd")


def test_param_groups_split_matrices_from_vectors():
    groups = param_groups(Net(), weight_decay=0.1)
    assert groups[0]["names"] == ["embed.weight", "linear.weight"]
    assert groups[0]["weight_decay"] == 0.1
    assert groups[1]["names"] == ["linear.bias", "norm.weight", "norm.bias"]
    assert groups[1]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out():
    net = Net()
    net.embed.weight.requires_grad_(False)
    names = [n for group in param_groups(net) for n in group["names"]]
    assert "embed.weight" not in names


def test_builders():
    config = RunConfig.create("pretrain", weight_decay=0.1, sparsity=0.5, patience=3)
    adamw = get_optimizer_spec("adamw").build(Net(), config)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["fused"]
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    blockllm = get_optimizer_spec("blockllm").build(Net(), config)
    assert isinstance(blockllm, BlockLLM)
    assert blockllm.sparsity == 0.5
    assert blockllm.patience == 3
    stats = get_optimizer_spec("blockllm").stats(blockllm)
    assert set(stats) >= {"num_reselections", "num_selected", "trainable_fraction"}


def test_the_papers_method_is_the_published_one_whatever_the_run_config_says():
    # `blockllm-paper` stays the published method: the rest frozen until selected (the run
    # config's --rest defaults to a state-free rule), the |G| >= tau mask, one tensor may take
    # the whole budget, single coordinates, the loss-plateau trigger, no entry warmup.
    for rest in ("auto", "sign"):
        paper = get_optimizer_spec("blockllm-paper").build(Net(), RunConfig.create("pretrain", rest=rest))
        settings = paper.config
        assert (settings.rest, settings.selection, settings.max_tensor_share) == ("none", "mask", 1.0)
        assert (settings.partial, settings.trigger, settings.entry_warmup) == ("coordinates", "loss", 0)


def test_adding_an_optimizer_is_one_entry():
    spec = OptimizerSpec(
        name="sgd-test",
        build=lambda model, config: torch.optim.SGD(model.parameters(), lr=config.lr),
        description="plain SGD",
    )
    register_optimizer(spec)
    try:
        config = RunConfig.create("pretrain", optimizer="sgd-test")
        assert isinstance(
            get_optimizer_spec(config.optimizer).build(Net(), config), torch.optim.SGD
        )
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer(spec)
    finally:
        OPTIMIZERS.pop("sgd-test")
