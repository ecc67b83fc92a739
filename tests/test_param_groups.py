"""blockllm.param_groups: the split every measured method uses, for BlockLLM and torch alike."""

import math

import pytest
import torch
from torch import nn

from blockllm import BlockLLM, param_groups


class TinyLM(nn.Module):
    """The two accessors transformers' models have, on a small untied language model."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.body(self.embed(tokens)))))


def _names(groups):
    return [group["names"] for group in groups]


def test_matrices_decay_vectors_do_not_and_the_vocabulary_gets_its_lr():
    groups = param_groups(TinyLM(), weight_decay=0.1, vocab_lr=1e-2)
    assert _names(groups) == [["body.weight"], ["body.bias", "norm.weight", "norm.bias"],
                              ["embed.weight", "head.weight"]]  # fmt: skip
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]
    assert "lr" not in groups[0] and "lr" not in groups[1] and groups[2]["lr"] == 1e-2
    # Without vocab_lr the vocabulary stays with the other matrices.
    assert _names(param_groups(TinyLM(), weight_decay=0.1))[0] == [
        "embed.weight", "body.weight", "head.weight"]  # fmt: skip


def test_a_tied_vocabulary_is_one_tensor_and_frozen_ones_are_left_out():
    model = TinyLM(tied=True)
    assert _names(param_groups(model, vocab_lr=1e-2))[-1] == ["embed.weight"]
    model.norm.requires_grad_(False)
    assert _names(param_groups(model)) == [["embed.weight", "body.weight"], ["body.bias"]]


def test_blockllm_and_adamw_train_alike_on_the_same_groups():
    # sparsity 0 is AdamW; the vocabulary's own lr reaches both the same way.
    torch.manual_seed(0)
    ours, theirs = TinyLM(), TinyLM()
    theirs.load_state_dict(ours.state_dict())
    opt = BlockLLM(param_groups(ours, weight_decay=0.1, vocab_lr=3e-2), lr=1e-3, sparsity=0.0)
    reference = torch.optim.AdamW(
        param_groups(theirs, weight_decay=0.1, vocab_lr=3e-2), lr=1e-3, fused=True
    )
    tokens = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    assert opt.param_groups[2]["params"] == [ours.embed.weight, ours.head.weight]
    assert opt.param_groups[2]["lr"] == 3e-2 and opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_lr": 0.0}, r"Invalid vocab_lr: 0.0 \(expected a number > 0, or None\)"),
        ({"vocab_lr": -1e-3}, r"Invalid vocab_lr: -0.001 \(expected a number > 0, or None\)"),
        ({"vocab_lr": math.nan}, r"Invalid vocab_lr: nan \(expected a number > 0, or None\)"),
        ({"vocab_lr": "1e-2"}, r"Invalid vocab_lr: '1e-2' \(expected a number > 0, or None\)"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay: -0.1 \(expected a number >= 0\)"),
        ({"weight_decay": math.inf}, r"Invalid weight_decay: inf \(expected a number >= 0\)"),
    ],
)
def test_bad_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        param_groups(TinyLM(), **kwargs)


def test_a_vocabulary_lr_for_a_model_without_one_is_an_error_not_ignored():
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    with pytest.raises(ValueError, match=r"Invalid vocab_lr: 0.01 for a Sequential, which has no"):
        param_groups(model, vocab_lr=1e-2)
    assert len(param_groups(model)) == 2  # without it: matrices and vectors
    # Frozen (as under LoRA): the lr would reach nothing either.
    frozen = TinyLM()
    frozen.embed.requires_grad_(False)
    frozen.head.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable .*\(none, or frozen\)"):
        param_groups(frozen, vocab_lr=1e-2)
    frozen.head.requires_grad_(True)  # one of the two is enough
    assert _names(param_groups(frozen, vocab_lr=1e-2))[-1] == ["head.weight"]


def test_the_name_is_the_function_whatever_was_imported_first():
    # A submodule named like the function would shadow it once imported (by the CLI's builders).
    import blockllm
    import blockllm.parameter_groups  # noqa: F401

    assert blockllm.param_groups is param_groups and callable(blockllm.param_groups)
