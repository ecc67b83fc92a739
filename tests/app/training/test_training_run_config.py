import dataclasses
import json

import pytest

from blockllm.app.training import ConfigError, RunConfig, defaults_for
from blockllm.app.training.run_config import field_help


def test_pretrain_defaults_follow_the_galore_recipe():
    config = RunConfig.create("pretrain")
    assert (config.model, config.data, config.optimizer) == ("tiny", "stdlib", "blockllm")
    assert (config.lr, config.min_lr_ratio, config.weight_decay) == (1e-3, 0.1, 0.0)
    assert config.sparsity == 0.9
    assert config.resolved_warmup_steps == 100  # 10 % of 1000 steps


def test_model_specific_defaults():
    assert RunConfig.create("pretrain", "llama-60m").seq_len == 256
    assert RunConfig.create("pretrain", "llama-60m").vocab_size == 32000
    minilm = RunConfig.create("finetune", "minilm")
    assert (minilm.lr, minilm.sparsity, minilm.eval_at_start) == (5e-5, 0.95, True)
    assert RunConfig.create("finetune", "gemma-270m").batch_size == 4


def test_overrides_win_over_defaults():
    config = RunConfig.create("finetune", "minilm", lr=1e-4, max_steps=7)
    assert (config.lr, config.max_steps, config.batch_size) == (1e-4, 7, 32)


def test_json_round_trip(tmp_path):
    config = RunConfig.create("pretrain", "llama-20m", lr=3e-4, max_chars=1000)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert RunConfig.from_json(path) == config
    assert json.loads(path.read_text())["lr"] == 3e-4


def test_every_field_has_help():
    for item in dataclasses.fields(RunConfig):
        assert field_help(item.name)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        TypeError, match=r"Unknown config keys \['learning_rate'\].*valid keys: .*lr"
    ):
        RunConfig.from_dict({**defaults_for("pretrain"), "learning_rate": 1})
    with pytest.raises(TypeError, match="valid keys"):
        RunConfig.create("pretrain", learning_rate=1)


@pytest.mark.parametrize(
    ("command", "changes", "message"),
    [
        (
            "pretrain",
            {"model": "llama-7b"},
            r"Invalid preset: 'llama-7b' \(choose from 'tiny', 'llama-20m', 'llama-60m'",
        ),
        (
            "pretrain",
            {"optimizer": "sgd"},
            r"Invalid optimizer: 'sgd' \(choose from .*'adamw'.*'blockllm'",
        ),
        (
            "finetune",
            {"model": "bert-large"},
            r"Invalid model: 'bert-large' \(choose from 'minilm', 'gemma-270m'",
        ),
        ("finetune", {"task": "mnli"}, r"Invalid task: 'mnli' \(choose from 'tweet-sentiment'"),
        (
            "pretrain",
            {"precision": "fp8"},
            r"Invalid precision: 'fp8' \(choose from 'auto', 'fp32', 'bf16', 'bf16-pure'\)",
        ),
        ("pretrain", {"device": "tpu"}, r"Invalid device: 'tpu'"),
        ("pretrain", {"max_steps": 0}, r"Invalid max_steps: 0 \(must be >= 1\)"),
        ("pretrain", {"sparsity": 1.0}, r"Invalid sparsity: 1.0 \(must be in \[0, 1\)\)"),
        ("pretrain", {"lr": -1.0}, r"Invalid lr: -1.0"),
        ("pretrain", {"lr": 0.0}, r"Invalid lr: 0.0 \(must be > 0.0\)"),
        ("finetune", {"lr": 0}, r"Invalid lr: 0 \(must be > 0.0\)"),
        ("pretrain", {"lr": float("nan")}, r"Invalid lr: nan"),
        ("pretrain", {"batch_size": 2.5}, r"Invalid batch_size: 2.5 \(expected an integer\)"),
        ("pretrain", {"eval_at_start": "yes"}, r"Invalid eval_at_start: 'yes'"),
        ("pretrain", {"eval_fraction": 0.0}, r"Invalid eval_fraction: 0.0"),
    ],
)
def test_bad_values_name_the_field_and_the_value(command, changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.create(command, **changes)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        RunConfig.create("pretrain", max_steps=-1)


def test_finetune_accepts_a_model_directory_and_a_jsonl_task(tmp_path):
    config = RunConfig.create("finetune", str(tmp_path), task=str(tmp_path / "task.jsonl"))
    assert config.model == str(tmp_path)


def test_differences_skip_resumable_fields():
    base = RunConfig.create("pretrain")
    moved = base.replace(save_every=7, keep_checkpoints=5, device="cpu", tensorboard=False)
    assert base.differences(moved) == {}
    assert set(base.differences(moved, include_resumable=True)) == {
        "save_every",
        "keep_checkpoints",
        "device",
        "tensorboard",
    }
    assert base.differences(base.replace(lr=2e-3)) == {"lr": (1e-3, 2e-3)}


def test_warmup_steps():
    assert RunConfig.create("pretrain", max_steps=50).resolved_warmup_steps == 5
    assert RunConfig.create("pretrain", max_steps=50, warmup_steps=0).resolved_warmup_steps == 0
    assert RunConfig.create("pretrain", max_steps=5, warmup_steps=9).resolved_warmup_steps == 5


def test_fields_of_the_other_command_are_none():
    pretrain = RunConfig.create("pretrain", "tiny")
    assert (pretrain.task, pretrain.task_kind, pretrain.max_train_examples) == (None, None, None)
    assert (pretrain.data, pretrain.vocab_size) == ("stdlib", 8192)
    finetune = RunConfig.create("finetune", "minilm")
    assert (finetune.task, finetune.task_kind) == ("tweet-sentiment", "auto")
    assert (finetune.data, finetune.vocab_size, finetune.eval_fraction, finetune.eval_batches) == (
        None, None, None, None,
    )  # fmt: skip
    assert RunConfig.from_dict(pretrain.to_dict()) == pretrain
    assert RunConfig.from_dict(finetune.to_dict()) == finetune


def test_an_older_config_json_with_the_other_commands_defaults_loads_as_the_same_run(tmp_path):
    # Until now a pretraining config.json carried "task": "tweet-sentiment" (and a finetuning
    # one "data": "stdlib"): it still loads, and a resume compares it equal to today's config.
    old = {**RunConfig.create("pretrain", "tiny").to_dict(), "task": "tweet-sentiment",
           "task_kind": "auto"}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    loaded = RunConfig.from_json(path)
    assert loaded.task is None
    assert loaded.differences(RunConfig.create("pretrain", "tiny"), include_resumable=True) == {}


def test_resume_conflicts_allow_a_new_max_steps_only():
    saved = RunConfig.create("pretrain", "tiny", max_steps=60)
    assert saved.replace(max_steps=100).resume_conflicts(saved) == {}
    assert saved.replace(max_steps=100).differences(saved) == {"max_steps": (100, 60)}
    assert saved.replace(lr=2e-3).resume_conflicts(saved) == {"lr": (2e-3, 1e-3)}


def test_gradient_checkpointing_is_off_by_default_and_may_change_on_resume():
    base = RunConfig.create("pretrain")
    assert base.gradient_checkpointing is False
    # A config.json written before the field existed meant "off".
    older = {key: value for key, value in base.to_dict().items() if key != "gradient_checkpointing"}
    assert RunConfig.from_dict(older) == base
    # It changes memory and speed, not the numbers: --resume may switch it.
    assert base.differences(base.replace(gradient_checkpointing=True)) == {}
    with pytest.raises(ConfigError, match="Invalid gradient_checkpointing: 'yes'"):
        RunConfig.create("pretrain", gradient_checkpointing="yes")
