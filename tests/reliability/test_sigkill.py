"""SIGKILL at random points of a real ``blockllm pretrain`` process, then ``--resume``.

A campaign starts the CLI in a subprocess, kills it with SIGKILL at a seeded random moment (while
it imports and loads, or just after a step's metrics line, which puts the kill inside the step,
its evaluation or its checkpoint write), checks the run directory, and restarts it the way a user
or a job scheduler would: with ``--resume`` once the run has left anything behind. After every kill:

* every file under a checkpoint's name loads and verifies (no half-written checkpoint, ever);
* the newest checkpoint never goes back: progress that was saved is never lost;
* every complete metrics line equals the uninterrupted run's line for the same step.

At the end the resumed run's ``metrics.jsonl`` equals an uninterrupted run's, line for line.
"""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from blockllm.app.cli.main import main
from blockllm.app.training.checkpoint import list_checkpoints, load_checkpoint
from tests.app.tiny import TINY_FLAGS
from tests.reliability.helpers import COUNTS, exact, read_lines, start_cli

# Start-up (imports, tokenizer cache, model) takes about 4.5 s on two busy cores.
STARTUP_KILL_WINDOW_S = 6.0
# A step takes about 40 ms and its checkpoint about 60 ms: a kill this soon after a metrics line
# lands in the checkpoint write as often as in the next step.
AFTER_LINE_WINDOW_S = 0.12
TIMEOUT_S = 180


def _flags(steps: int, extra: tuple[str, ...]) -> list[str]:
    return [*TINY_FLAGS, "--max-steps", str(steps), "--save-every", "1", "--eval-every", "5",
            "--patience", "2", "--threads", "1", *extra]  # fmt: skip


def _newest_step(out_dir) -> int:
    found = list_checkpoints(out_dir / "checkpoints")
    return found[-1][0] if found else 0


def _wait_for_progress(process, out_dir, lines_before, step_before, timeout=TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if len(read_lines(out_dir)) > lines_before or _newest_step(out_dir) > step_before:
            return
        time.sleep(0.005)


def _sleep_unless_done(process, seconds) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)


def _sleep_within_startup(process, out_dir, lines_before, step_before, seconds) -> None:
    """Sleep ``seconds`` at most, but no longer than the start-up lasts.

    On a fast machine start-up takes less than the kill window; sleeping through it would let a
    short run finish before the planned kill, so the kill comes at the first sign of progress.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if len(read_lines(out_dir)) > lines_before or _newest_step(out_dir) > step_before:
            return
        time.sleep(0.005)


def _check_after_kill(out_dir, reference, step_before, problems) -> int:
    """Everything a kill may never break; returns the newest checkpoint's step."""
    for step, path in list_checkpoints(out_dir / "checkpoints"):
        try:
            record = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any failure here is the bug being tested
            problems.append(f"checkpoint {path.name} does not load after a kill: {exc}")
            continue
        if record["step"] != step:
            problems.append(f"{path.name} holds step {record['step']}")
    newest = _newest_step(out_dir)
    if newest < step_before:
        problems.append(f"saved progress went back from step {step_before} to {newest}")
    by_step = {line["step"]: line for line in exact(reference)}
    for line in exact(read_lines(out_dir)):
        if by_step.get(line["step"]) != line:
            problems.append(f"metrics line of step {line['step']} differs: {line}")
    return newest


def kill_campaign(tmp_path, cache_dir, *, steps, kills, seed, modes=None, extra=()):
    """Kill a run ``kills`` times, resume it to the end, and compare with an uninterrupted run."""
    flags = _flags(steps, tuple(extra))
    reference_dir = tmp_path / "straight"
    assert main(["pretrain", *flags, "--progress", "off", "--output-dir", str(reference_dir),
                 "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    reference = read_lines(reference_dir)
    assert len(reference) == steps

    out_dir = tmp_path / "killed"
    rng = random.Random(seed)
    problems: list[str] = []
    survived, where = 0, []
    while survived < kills:
        step_before = _newest_step(out_dir)
        lines_before = len(read_lines(out_dir))
        # What a restart script does (docs/reliability.md): --resume once the run left a
        # checkpoint or a non-empty metrics file behind.
        metrics_file = out_dir / "metrics.jsonl"
        resume = step_before > 0 or (metrics_file.is_file() and metrics_file.stat().st_size > 0)
        process = start_cli("pretrain", *flags, "--progress", "off", "--output-dir", str(out_dir),
                            "--cache-dir", str(cache_dir), *(["--resume"] if resume else []))  # fmt: skip
        mode = modes[survived] if modes else rng.choice(["startup", "step", "step"])
        if mode == "startup":
            window = rng.uniform(0.0, STARTUP_KILL_WINDOW_S)
            _sleep_within_startup(process, out_dir, lines_before, step_before, window)
        else:
            _wait_for_progress(process, out_dir, lines_before, step_before)
            _sleep_unless_done(process, rng.uniform(0.0, AFTER_LINE_WINDOW_S))
        if process.poll() is not None:
            _, err = process.communicate()
            assert process.returncode == 0, err
            break  # it finished before the kill: the campaign is over early
        process.kill()  # SIGKILL: no handler, no cleanup, no flush
        process.communicate(timeout=TIMEOUT_S)
        survived += 1
        if list((out_dir / "checkpoints").glob(".tmp-*")):
            COUNTS["kills in the middle of a checkpoint write"] += 1
        newest = _check_after_kill(out_dir, reference, step_before, problems)
        where.append(f"{mode}:{step_before}->{newest}")

    final = start_cli("pretrain", *flags, "--progress", "off", "--output-dir", str(out_dir),
                      "--cache-dir", str(cache_dir), "--resume")  # fmt: skip
    try:
        _, err = final.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        final.kill()
        raise
    assert final.returncode == 0, err
    if exact(read_lines(out_dir)) != exact(reference):
        problems.append("the resumed run's metrics differ from the uninterrupted run's")
    leftovers = [
        p.name for p in (out_dir / "checkpoints").iterdir() if not p.name.startswith("step_")
    ]
    if leftovers:
        problems.append(f"files left behind: {leftovers}")
    COUNTS["kills survived"] += survived
    COUNTS["anything lost"] += len(problems)
    assert not problems, (problems, where)
    return survived, where


def test_two_kills_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    survived, where = kill_campaign(
        tmp_path, cache_dir, steps=10, kills=2, seed=0, modes=["step", "startup"]
    )
    assert survived == 2, where


@pytest.mark.slow
def test_many_random_kills_blockllm(tmp_path, cache_dir):
    # A kill late in the start-up window lets a launch run ~15 steps: 100 steps leave room for
    # every planned kill before the run completes.
    survived, where = kill_campaign(tmp_path, cache_dir, steps=100, kills=25, seed=7)
    assert survived == 25, where


@pytest.mark.slow
def test_many_random_kills_adamw_accumulating_keeping_one(tmp_path, cache_dir):
    survived, where = kill_campaign(
        tmp_path, cache_dir, steps=24, kills=12, seed=11,
        extra=("--optimizer", "adamw", "--grad-accum", "2", "--keep-checkpoints", "1"),
    )  # fmt: skip
    assert survived >= 10, where
