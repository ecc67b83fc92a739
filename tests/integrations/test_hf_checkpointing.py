"""Gradient checkpointing with frozen blocks: a selected tensor below frozen layers still learns.

With reentrant checkpointing, a checkpointed layer whose inputs need no gradient returns an output
that needs none either, so its weights silently get no gradient (peers.md: peft #1142,
transformers #42489, BAdam #2). BlockLLM freezes everything but the selection, so this bites as
soon as the embeddings are not selected. The tests below show the failure and that our defaults
avoid it.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockllm import BlockLLM  # noqa: E402
from blockllm.integrations import (  # noqa: E402
    BlockLLMCallback,
    create_blockllm_optimizer,
    prepare_model_for_blockllm,
)
from blockllm.integrations.hf import checkpointing_mode  # noqa: E402

LOW = "model.layers.0.mlp.down_proj.weight"  # selected, under three frozen layers
TOP = "model.norm.weight"  # selected too, so the loss needs grad even when LOW gets none


def _enable_checkpointing(model, use_reentrant):
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _low_and_top_only(model):
    # sparsity=0 with an include list: exactly these two tensors are trainable, always.
    return BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.0, include=[LOW, TOP])


def _backward(model, dataset):
    batch = {
        key: torch.stack([dataset[i][key] for i in range(4)]) for key in ("input_ids", "labels")
    }
    model(**batch).loss.backward()
    return dict(model.named_parameters())


def test_non_reentrant_default_gives_gradient_below_frozen_layers(make_llama, dataset):
    model = prepare_model_for_blockllm(make_llama(num_layers=4))
    assert checkpointing_mode(model) == "non_reentrant"
    _low_and_top_only(model)
    params = _backward(model, dataset)
    assert params[LOW].grad is not None and params[LOW].grad.abs().sum() > 0
    assert params[TOP].grad is not None
    frozen = [name for name, p in params.items() if name not in (LOW, TOP)]
    assert all(params[name].grad is None and not params[name].requires_grad for name in frozen)


def test_reentrant_without_input_grads_drops_the_gradient_and_the_step_says_so(
    make_llama, dataset, caplog
):
    # What peers ship: reentrant checkpointing and nothing that makes the inputs require grad.
    model = make_llama(num_layers=4)
    _enable_checkpointing(model, use_reentrant=True)
    model.disable_input_require_grads()
    assert checkpointing_mode(model) == "reentrant"
    optimizer = _low_and_top_only(model)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        params = _backward(model, dataset)
    assert params[TOP].grad is not None  # the step runs...
    assert params[LOW].grad is None  # ...and cannot update the selected low tensor
    with caplog.at_level("WARNING", logger="blockllm"):
        optimizer.step()
        optimizer.zero_grad()
        with pytest.warns(UserWarning):
            _backward(model, dataset)
        optimizer.step()
    said = [r.getMessage() for r in caplog.records if "got no gradient" in r.getMessage()]
    assert len(said) == 1 and LOW in said[0] and TOP not in said[0]  # once, by name
    assert "use_reentrant=False" in said[0]


def test_prepare_model_makes_reentrant_checkpointing_correct(make_llama, dataset):
    model = prepare_model_for_blockllm(
        make_llama(num_layers=4), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    assert checkpointing_mode(model) == "reentrant"
    _low_and_top_only(model)
    params = _backward(model, dataset)
    assert params[LOW].grad is not None and params[LOW].grad.abs().sum() > 0


def test_non_reentrant_backward_stops_below_the_lowest_selected_tensor(make_llama, dataset):
    # transformers adds input-grad hooks whenever it enables checkpointing; with non-reentrant
    # checkpointing they are useless and make backward run through every frozen layer.
    seen = {}

    def record(module, args):
        seen["requires_grad"] = args[0].requires_grad

    for prepare, expected in ((False, True), (True, False)):
        model = make_llama(num_layers=4)
        _enable_checkpointing(model, use_reentrant=False)
        if prepare:
            prepare_model_for_blockllm(model, gradient_checkpointing=False)
        BlockLLM(model.named_parameters(), sparsity=0.0, include=["lm_head.weight"])
        model.model.norm.register_forward_pre_hook(record)
        _backward(model, dataset)
        assert seen["requires_grad"] is expected


def test_checkpointing_does_not_change_selection_or_training(make_llama, dataset):
    # Real selection (every candidate scored by hooks) with and without checkpointing: the same
    # blocks are chosen and the parameters agree after several steps, reselections included.
    results = []
    for checkpoint in (False, True):
        model = make_llama(num_layers=3)
        if checkpoint:
            prepare_model_for_blockllm(model)
        optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.8, patience=2)
        for step in range(8):
            rows = [dataset[(4 * step + i) % len(dataset)] for i in range(4)]
            batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step(loss=loss)
            optimizer.zero_grad(set_to_none=True)
        results.append((optimizer, dict(model.named_parameters())))
    (plain, plain_params), (checkpointed, checkpointed_params) = results
    assert checkpointed.num_reselections == plain.num_reselections >= 1
    assert checkpointed.selected == plain.selected
    for name, param in checkpointed_params.items():
        torch.testing.assert_close(param, plain_params[name], msg=name)


class StripInputGrads(transformers.TrainerCallback):
    """Leaves the model as transformers 4.x does: reentrant checkpointing, no input-grad hooks."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.disable_input_require_grads()


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize(
    ("use_reentrant", "manage", "learns"),
    [
        (False, True, True),  # our default path
        (True, True, True),  # the callback restores the input-grad hooks reentrant mode needs
        (True, False, False),  # the control: without them the low tensor silently never moves
    ],
)
def test_trainer_with_checkpointing_updates_a_tensor_below_frozen_layers(
    make_llama, make_args, dataset, use_reentrant, manage, learns
):
    model = make_llama(num_layers=4)
    # TrainingArguments renamed gradient_checkpointing to activation_checkpointing in v5.
    fields = transformers.TrainingArguments.__dataclass_fields__
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    args = make_args(
        max_steps=4,
        **{
            f"{prefix}_checkpointing": True,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": use_reentrant},
        },
    )
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.0, include=[LOW, TOP])
    low_before = model.get_parameter(LOW).detach().clone()
    top_before = model.get_parameter(TOP).detach().clone()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizers=(optimizer, None),
        callbacks=[StripInputGrads(), BlockLLMCallback(manage_checkpointing=manage)],
    )
    trainer.train()
    assert checkpointing_mode(model) == ("reentrant" if use_reentrant else "non_reentrant")
    assert not torch.equal(model.get_parameter(TOP), top_before)
    assert (not torch.equal(model.get_parameter(LOW), low_before)) is learns
