"""The example scripts run end to end (each in its own process, as a user would run them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script, *arguments, cwd):
    # One intra-op thread: the models are tiny, and see the thread pinning in tests/conftest.py.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # Each example prints one JSON summary as its last line.
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_hf_trainer_example_trains_checkpoints_and_resumes(tmp_path):
    output = str(tmp_path / "run")
    # Patience 3: with the default rest rule the loss keeps falling through 30 steps at the
    # example's patience of 5 (no plateau to log); at 3 it plateaus about five times.
    common = ["--output-dir", output, "--save-steps", "15", "--gradient-checkpointing",
              "--patience", "3"]  # fmt: skip
    first, log = _run("hf_trainer.py", "--max-steps", "30", *common, cwd=tmp_path)
    assert first["global_step"] == 30
    assert first["last_loss"] < first["first_loss"]
    assert first["num_reselections"] >= 1
    assert "loss plateau at step" in log

    resumed, log = _run("hf_trainer.py", "--max-steps", "40", "--resume", *common, cwd=tmp_path)
    assert resumed["global_step"] == 40
    assert "selection restored at global step 30" in log
    assert resumed["num_reselections"] >= first["num_reselections"]


def test_accelerate_example_bf16_with_gradient_accumulation(tmp_path):
    summary, _ = _run(
        "accelerate_loop.py", "--cpu", "--epochs", "1", "--grad-accum", "2", cwd=tmp_path
    )
    assert summary["mixed_precision"] == "bf16"
    assert summary["compute_dtypes"] == ["torch.bfloat16"]
    # 128 rows / batch 4 = 32 micro-batches, 2 per optimizer step.
    assert summary["optimizer_steps"] == summary["logged_steps"] == 16
    assert summary["num_reselections"] >= 1
    assert summary["last_losses_mean"] < summary["first_losses_mean"]
    assert summary["every_candidate_trainable"]
    # The trigger saw each step's mean micro-batch loss, through record_loss.
    window = summary["trigger_window"]
    assert window == pytest.approx(summary["step_losses"][-len(window) :], abs=1e-6)
