"""BlockLLM under transformers.Trainer: training, the loss trigger, logging, wrong optimizers."""

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockllm import BlockLLM  # noqa: E402
from blockllm.integrations import (  # noqa: E402
    BlockLLMCallback,
    create_blockllm_optimizer,
    unwrap_blockllm,
)


def _train(make_llama, make_args, dataset, callbacks, **blockllm_kwargs):
    model = make_llama()
    args = make_args()
    options = {"sparsity": 0.8, "patience": 5, **blockllm_kwargs}
    optimizer = create_blockllm_optimizer(model, args, **options)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer, optimizer


def test_trainer_lowers_loss_and_reselects_on_plateau(make_llama, make_args, dataset, caplog):
    callback = BlockLLMCallback()
    with caplog.at_level(logging.INFO, logger="blockllm"):
        trainer, optimizer = _train(make_llama, make_args, dataset, [callback])

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5

    # The paper's loss trigger fired under Trainer, and the reselection really happened.
    assert optimizer.config.trigger == "loss"
    assert optimizer.num_reselections >= 1
    assert callback.reselection_steps, "the callback saw no plateau"
    assert any("loss plateau at step" in record.getMessage() for record in caplog.records)
    # Still within budget, and only selected tensors are trainable.
    assert 0 < optimizer.num_selected <= optimizer.budget
    assert trainer.state.global_step == 40


def test_without_the_callback_the_loss_trigger_never_fires(make_llama, make_args, dataset):
    # The control for the test above: Trainer calls step() without a loss, so only the
    # callback's loss feed can fire the trigger.
    _, optimizer = _train(make_llama, make_args, dataset, [])
    assert optimizer.num_reselections == 0
    assert optimizer.num_selections == 1


def test_blockllm_values_reach_trainer_logs(make_llama, make_args, dataset):
    callback = BlockLLMCallback()
    trainer, optimizer = _train(make_llama, make_args, dataset, [callback])
    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    expected = {
        "blockllm/num_reselections",
        "blockllm/num_selected",
        "blockllm/budget",
        "blockllm/trainable_fraction",
        "blockllm/selection_seconds",
        "blockllm/num_skipped_steps",
        "blockllm/memory/params_bytes",
        "blockllm/memory/grads_bytes",
        "blockllm/memory/optimizer_state_bytes",
        "blockllm/memory/master_weights_bytes",
    }
    for entry in training_logs:
        assert expected <= entry.keys()
    last = training_logs[-1]
    assert last["blockllm/num_reselections"] == optimizer.num_reselections
    assert last["blockllm/trainable_fraction"] == pytest.approx(optimizer.trainable_fraction)
    # Taken right after the optimizer step: the selected tensors' gradients and moments exist.
    assert last["blockllm/memory/grads_bytes"] > 0
    assert last["blockllm/memory/optimizer_state_bytes"] > 0
    counts = [entry["blockllm/num_reselections"] for entry in training_logs]
    assert counts == sorted(counts)
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and "blockllm/num_reselections" in summary
    # Trainer's max_grad_norm moved into BlockLLM: the norm BlockLLM clipped with is logged.
    assert trainer.args.max_grad_norm == 0
    assert last["grad_norm"] == optimizer.last_grad_norm > 0


class _TrainersGradNorm(transformers.TrainerCallback):
    """Placed before BlockLLMCallback: sees the grad_norm Trainer itself logged."""

    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.values.append(logs["grad_norm"])


@pytest.mark.parametrize(
    ("options", "relation"),
    [({}, "larger"), ({"sparsity": 0.0}, "equal")],
)
def test_logged_grad_norm_is_the_whole_gradients_without_a_clip(
    make_llama, make_args, dataset, options, relation
):
    model = make_llama()
    args = make_args(max_grad_norm=0.0)  # nothing clips: the callback takes the norm itself
    optimizer = create_blockllm_optimizer(
        model, args, **{"sparsity": 0.8, "patience": 5, **options}
    )
    assert optimizer.config.max_grad_norm is None
    trainers = _TrainersGradNorm()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizers=(optimizer, None),
        callbacks=[trainers, BlockLLMCallback()],
    )
    trainer.train()
    ours = [entry["grad_norm"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(ours) == len(trainers.values) > 2
    for whole, dot_grad in zip(ours, trainers.values):
        if relation == "equal":  # every tensor selected whole: .grad holds the whole gradient
            assert whole == pytest.approx(dot_grad, rel=1e-5)
        else:  # the rest rule's gradients were used and freed in backward: .grad lacks them
            assert whole > 1.05 * dot_grad


def test_trigger_sees_the_loss_trainer_logs_with_accumulation(make_llama, make_args, dataset):
    # Gradient accumulation: Llama accepts num_items_in_batch, so each micro-batch loss is a share
    # of the step loss. The trigger must see the same per-step loss as Trainer's log, and
    # evaluation forwards must not reach it.
    model = make_llama()
    args = make_args(
        max_steps=6,
        logging_steps=1,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=8,
    )
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.8, patience=1000)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        optimizers=(optimizer, None),
        callbacks=[BlockLLMCallback()],
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    window = optimizer.state_dict()["blockllm"]["trigger"]["window"]
    assert len(window) == 6
    assert window == pytest.approx(logged, abs=1e-3)


def test_callback_with_given_optimizer_and_accelerated_wrapper(make_llama, make_args, dataset):
    callback = BlockLLMCallback(None)
    trainer, optimizer = _train(make_llama, make_args, dataset, [callback], patience=3)
    # Trainer wraps the optimizer in accelerate's AcceleratedOptimizer; both views agree.
    assert unwrap_blockllm(trainer.optimizer) is optimizer
    assert callback.optimizer is optimizer


def test_callback_rejects_a_trainer_without_blockllm(make_llama, make_args, dataset):
    model = make_llama()
    args = make_args(max_steps=2)
    # Trainer builds its own AdamW at train(): the callback refuses before the first step.
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset, callbacks=[BlockLLMCallback()]
    )
    with pytest.raises(
        TypeError, match="BlockLLMCallback needs the Trainer to train with BlockLLM"
    ):
        trainer.train()
    assert trainer.state.global_step == 0

    # An optimizer handed to Trainer(...) is checked at construction already.
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="got AdamW"):
        transformers.Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            optimizers=(adamw, None),
            callbacks=[BlockLLMCallback()],
        )


def test_callback_rejects_a_different_blockllm(make_llama, make_args, dataset):
    model = make_llama()
    args = make_args(max_steps=2)
    used = create_blockllm_optimizer(model, args)
    other = BlockLLM(make_llama().named_parameters())
    with pytest.raises(ValueError, match="different BlockLLM"):
        transformers.Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            optimizers=(used, None),
            callbacks=[BlockLLMCallback(other)],
        )


def test_callback_removes_its_hook_after_training(make_llama, make_args, dataset):
    callback = BlockLLMCallback()
    trainer, optimizer = _train(make_llama, make_args, dataset, [callback])
    model = trainer.model
    before = optimizer.state_dict()["blockllm"]["trigger"]
    output = model(**{key: value[None] for key, value in dataset[0].items()})
    output.loss.backward()
    optimizer.step()  # no loss reaches the trigger any more: the forward hook is gone
    after = optimizer.state_dict()["blockllm"]["trigger"]
    assert after["window"] == before["window"]


def test_a_norm_trainer_clipped_with_itself_stays_in_the_logs(make_llama, make_args, dataset):
    # An optimizer whose .grad holds every gradient it uses may leave the clip to Trainer,
    # which logs the norm before its clip; measured after it, the callback's would read 0.05.
    model = make_llama()
    args = make_args(max_grad_norm=0.05)
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.8, patience=5,
                                          max_grad_norm=None, compact_grads=False, rest="none")  # fmt: skip
    assert args.max_grad_norm == 0.05  # Trainer keeps its clip
    trainers = _TrainersGradNorm()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizers=(optimizer, None),
                                   callbacks=[trainers, BlockLLMCallback()])  # fmt: skip
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == trainers.values and min(logged) > 0.1


@pytest.mark.parametrize("masters", [True, False])
def test_trainer_trains_a_bf16_model_with_or_without_masters(make_args, dataset, masters):
    # A model loaded in bf16 (from_pretrained(..., torch_dtype=torch.bfloat16)): masters for
    # the block by default, none with master_weights=False; both learn.
    from tests.integrations.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    args = make_args(max_steps=20)
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.8, patience=5,
                                          master_weights=masters)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizers=(optimizer, None))  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.3
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with_master = [state for state in optimizer.state.values() if "master" in state]
    assert bool(with_master) == masters and optimizer.state
