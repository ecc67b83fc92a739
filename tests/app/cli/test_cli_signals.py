"""SIGINT/SIGTERM/SIGHUP on a real `blockllm pretrain` process: clean exit, loadable checkpoint, exact resume."""

import os
import signal
import subprocess
import sys
import time

import pytest

from blockllm.app.cli.main import main
from blockllm.app.training.checkpoint import latest_checkpoint, load_checkpoint
from tests.app.tiny import TINY_FLAGS, metrics

FLAGS = [
    *TINY_FLAGS,
    "--max-steps",
    "60",
    "--eval-every",
    "20",
    "--save-every",
    "1000",
    "--patience",
    "3",
]
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "eval_loss", "num_reselections")


def _start(out_dir, cache_dir):
    command = [sys.executable, "-m", "blockllm", "pretrain", *FLAGS, "--threads", "1",
               "--log-level", "warning", "--output-dir", str(out_dir), "--cache-dir", str(cache_dir)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path, count, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no progress within the timeout")


# SIGHUP is what a closed terminal or a dropped SSH session sends.
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_signal_mid_run_leaves_a_checkpoint_that_resumes_exactly(
    signum, tmp_path, cache_dir, capsys
):
    out_dir = tmp_path / "run"
    process = _start(out_dir, cache_dir)
    _wait_for_lines(out_dir / "metrics.jsonl", 3, process)
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1].startswith(f"blockllm: interrupted by {name} after step ")

    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    record = load_checkpoint(checkpoint)  # loadable, weights_only
    stopped_at = record["step"]
    assert 3 <= stopped_at < 60
    assert f"after step {stopped_at};" in err
    assert metrics(out_dir)[-1]["step"] == stopped_at

    # --resume alone continues it; the result equals a run that was never interrupted.
    assert main(["pretrain", "--output-dir", str(out_dir), "--resume", "--progress", "off",
                 "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    assert main(["pretrain", *FLAGS, "--output-dir", str(tmp_path / "straight"),
                 "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    capsys.readouterr()

    def exact(records):
        return [{k: r[k] for k in EXACT_KEYS if k in r} for r in records]

    assert exact(metrics(out_dir)) == exact(metrics(tmp_path / "straight"))
    assert len(metrics(out_dir)) == 60
