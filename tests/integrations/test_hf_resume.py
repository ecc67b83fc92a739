"""Trainer checkpoint -> resume -> continue gives the parameters of an uninterrupted run."""

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockllm.integrations import BlockLLMCallback, create_blockllm_optimizer  # noqa: E402

MAX_STEPS = 40
SAVE_AT = 20


class SelectionProbe(transformers.TrainerCallback):
    """Records which candidates are trainable when a run starts and at each checkpoint."""

    def __init__(self, optimizer, trainable_candidates):
        self.optimizer = optimizer
        self.trainable = trainable_candidates
        self.at_begin = None
        self.at_save = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = {
            "step": state.global_step,
            "trainable": self.trainable(self.optimizer),
            "selected": self.optimizer.selected,
            "pending": self.optimizer.selection_pending,
        }

    def on_save(self, args, state, control, **kwargs):
        self.at_save[state.global_step] = {
            "trainable": self.trainable(self.optimizer),
            "selected": self.optimizer.selected,
            "num_reselections": self.optimizer.num_reselections,
        }


def _trainer(make_llama, make_args, dataset, trainable_candidates, output_dir, rest):
    model = make_llama()
    args = make_args(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=10,
    )
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.8, patience=5, rest=rest)
    probe = SelectionProbe(optimizer, trainable_candidates)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizers=(optimizer, None),
        callbacks=[BlockLLMCallback(optimizer), probe],
    )
    return trainer, optimizer, probe


# "none": only the selected block trains (its requires_grad is restored on resume); "sign"
# (the default): every candidate trains, the rest state-free.
@pytest.mark.parametrize("rest", ["none", "sign"])
def test_resume_from_checkpoint_matches_uninterrupted_run(
    make_llama, make_args, dataset, trainable_candidates, tmp_path, caplog, rest
):
    full, full_opt, full_probe = _trainer(
        make_llama, make_args, dataset, trainable_candidates, tmp_path / "full", rest
    )
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    saved = full_probe.at_save[SAVE_AT]

    # The window after the checkpoint crosses at least one reselection, so the restored trigger
    # window, visit counts and selection all matter for the result.
    assert full_opt.num_reselections > saved["num_reselections"]

    # Trainer's own save/load path: torch.save, then torch.load(weights_only=True).
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    assert state["blockllm"]["selected"] == saved["selected"]

    resumed, resumed_opt, resumed_probe = _trainer(
        make_llama, make_args, dataset, trainable_candidates, tmp_path / "resumed", rest
    )
    # A fresh optimizer scores every candidate on its first backward...
    everything = set(resumed_opt.candidate_names)
    assert trainable_candidates(resumed_opt) == everything
    with caplog.at_level(logging.INFO, logger="blockllm.integrations"):
        resumed.train(resume_from_checkpoint=str(checkpoint))

    # ...the resumed one starts from the checkpoint's selection instead.
    begin = resumed_probe.at_begin
    assert begin["step"] == SAVE_AT
    assert begin["selected"] == saved["selected"]
    assert begin["trainable"] == saved["trainable"]
    # ...and with the rest frozen only the restored block needs gradients.
    assert (begin["trainable"] == everything) == (rest != "none")
    assert any("selection restored at global step 20" in r.getMessage() for r in caplog.records)
    # Nothing was out of step, with the frozen rule or with a rest rule (every tensor trainable).
    assert not any("re-applying it" in r.getMessage() for r in caplog.records)

    assert resumed_opt.num_reselections == full_opt.num_reselections
    assert resumed_opt.selected == full_opt.selected
    full_params = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, full_params[name], rtol=0, atol=0, msg=name)


class MakeEverythingTrainable(transformers.TrainerCallback):
    """User code that flips requires_grad on after the optimizer state was loaded."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for param in model.parameters():
            param.requires_grad_(True)


def test_callback_reapplies_the_restored_selection(
    make_llama, make_args, dataset, trainable_candidates, tmp_path, caplog
):
    # The frozen rest: the one mode in which requires_grad carries the selection.
    full, full_opt, full_probe = _trainer(
        make_llama, make_args, dataset, trainable_candidates, tmp_path / "full", "none"
    )
    full.train()
    resumed, resumed_opt, resumed_probe = _trainer(
        make_llama, make_args, dataset, trainable_candidates, tmp_path / "resumed", "none"
    )
    # Runs before BlockLLMCallback (callbacks are called in order).
    resumed.callback_handler.callbacks.insert(0, MakeEverythingTrainable())
    with caplog.at_level(logging.WARNING, logger="blockllm.integrations"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"))
    assert any("re-applying it" in record.getMessage() for record in caplog.records)
    assert resumed_probe.at_begin["trainable"] == full_probe.at_save[SAVE_AT]["trainable"]
    full_params = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, full_params[name], rtol=0, atol=0, msg=name)
