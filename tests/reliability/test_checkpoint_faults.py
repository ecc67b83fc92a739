"""Damaged checkpoints and full disks: detected, the previous checkpoint used, nothing lost.

Every damage (flipped bits, truncation, appended or zeroed bytes) must be caught before a single
tensor is used; ``--resume`` then continues from the previous checkpoint with a warning naming both
files and keeps the damaged one as ``.corrupt``. A checkpoint that cannot be written (a full disk,
simulated at every point of the write and for real through ``RLIMIT_FSIZE``) leaves every earlier
checkpoint intact; training goes on, and only the final save turns it into an error.
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
import sys

import pytest
import torch

from blockllm.app.cli.main import main
from blockllm.app.training import TrainingRun
from blockllm.app.training import checkpoint as checkpoint_module
from blockllm.app.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from blockllm.app.training.run_errors import (
    CheckpointError,
    CheckpointVersionError,
    CorruptCheckpointError,
)
from tests.app.tiny import TINY_FLAGS, snapshot, tiny_config
from tests.reliability.helpers import COUNTS, exact, read_lines

CONFIG = dict(max_steps=8, eval_every=4, save_every=2)
FLAGS = [*TINY_FLAGS, "--max-steps", "8", "--eval-every", "4", "--save-every", "2",
         "--patience", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """One uninterrupted 8-step run (checkpoints at steps 6 and 8), shared read-only."""
    out = tmp_path_factory.mktemp("straight") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test thread pinning
    try:
        assert (
            main(["pretrain", *FLAGS, "--output-dir", str(out), "--cache-dir", str(cache_dir)]) == 0
        )
    finally:
        torch.set_num_threads(previous)
    return out


def _copy(straight, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(straight, target)
    return target


def _small_checkpoint(directory, step=3):
    payload = {"model": {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(step))},
               "config": {"lr": 1e-3}, "counters": [1, 2, 3]}  # fmt: skip
    return save_checkpoint(directory, step, payload, keep=10)


# ---------------------------------------------------------------------- the file format


def test_checkpoint_is_a_plain_torch_file_ending_in_a_checksum_line(tmp_path):
    path = _small_checkpoint(tmp_path)
    data = path.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()
    assert last.startswith("blockllm-checkpoint format=2 blockllm=")
    assert " sha256=" in last and f" size={len(data) - len(last) - 2}" in last
    # torch ignores the line: the file stays loadable without blockllm.
    plain = torch.load(path, weights_only=True)
    assert plain["format"] == 2 and plain["step"] == 3
    assert torch.equal(load_checkpoint(path)["model"]["w"], plain["model"]["w"])


def _damages(data: bytes, count: int, seed: int):
    """``count`` damaged copies of ``data``: bit flips (often in the checksum line), truncations,
    appended bytes and zeroed blocks, the way disks and interrupted copies damage files."""
    rng = random.Random(seed)
    for number in range(count):
        kind = number % 5
        damaged = bytearray(data)
        if kind in (0, 1):
            # kind 1 aims at the checksum line and the archive's directory at the end
            low = 0 if kind == 0 else max(0, len(data) - 400)
            offset = rng.randrange(low, len(data))
            damaged[offset] ^= 1 << rng.randrange(8)
            yield f"flip@{offset}", bytes(damaged)
        elif kind == 2:
            length = rng.randrange(0, len(data))
            yield f"truncate@{length}", bytes(damaged[:length])
        elif kind == 3:
            yield (
                "append",
                bytes(damaged) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
            )
        else:
            start = rng.randrange(0, len(data))
            damaged[start : start + 512] = bytes(min(512, len(data) - start))
            if bytes(damaged) == data:
                continue  # the block was zero already
            yield f"zero@{start}", bytes(damaged)


def _check_damages(tmp_path, count, seed):
    path = _small_checkpoint(tmp_path)
    data = path.read_bytes()
    detected = 0
    for label, damaged in _damages(data, count, seed):
        path.write_bytes(damaged)
        with pytest.raises((CorruptCheckpointError, CheckpointVersionError)):
            load_checkpoint(path)
            pytest.fail(f"damage {label} was not detected")
        detected += 1
    COUNTS["damaged checkpoints detected"] += detected
    path.write_bytes(data)
    assert load_checkpoint(path)["step"] == 3
    return detected


def test_every_damage_is_detected(tmp_path):
    assert _check_damages(tmp_path, 250, seed=0) >= 240


@pytest.mark.slow
def test_every_damage_is_detected_many(tmp_path):
    assert _check_damages(tmp_path, 5000, seed=1) >= 4900


# ---------------------------------------------------------------------- falling back on resume


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside tensor data: torch alone would load it silently
    path.write_bytes(bytes(data))


def _cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


@pytest.mark.parametrize("damage", [_flip_a_bit, _cut_short], ids=["bit-flip", "truncated"])
def test_resume_uses_the_previous_checkpoint_with_a_clear_message(
    damage, straight, tmp_path, cache_dir, capsys
):
    run = _copy(straight, tmp_path)
    newest = run / "checkpoints" / "step_00000008.pt"
    damage(newest)
    damaged_bytes = newest.read_bytes()

    code = main(["pretrain", "--output-dir", str(run), "--resume", "--progress", "off",
                 "--cache-dir", str(cache_dir)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "step_00000008.pt is corrupt" in err
    assert "resuming from the previous checkpoint step_00000006.pt (step 6) instead" in err
    assert "Kept the damaged checkpoint as" in err

    # The run redid steps 7 and 8 exactly; the damaged file was kept, not deleted.
    assert exact(read_lines(run)) == exact(read_lines(straight))
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [6, 8]
    assert load_checkpoint(newest)["step"] == 8
    assert (run / "checkpoints" / "step_00000008.pt.corrupt").read_bytes() == damaged_bytes


def test_every_checkpoint_damaged_is_an_error_naming_each_and_touching_nothing(
    straight, tmp_path, cache_dir
):
    run = _copy(straight, tmp_path)
    _flip_a_bit(run / "checkpoints" / "step_00000008.pt")
    _cut_short(run / "checkpoints" / "step_00000006.pt")
    before = snapshot(run)
    with pytest.raises(CorruptCheckpointError) as caught:
        TrainingRun(tiny_config(**CONFIG), run, resume=True, cache_dir=cache_dir)
    message = str(caught.value)
    assert "every checkpoint in" in message and "nothing to resume from" in message
    assert "step_00000008.pt is corrupt: checksum mismatch" in message
    assert "step_00000006.pt is corrupt" in message
    assert snapshot(run) == before


# ---------------------------------------------------------------------- full disks


class _FillingDisk:
    """Stands in for ``open`` in the checkpoint module: writes fail with ENOSPC after ``budget``
    bytes, the way a full disk fails them (possibly half-way through a buffer)."""

    def __init__(self, budget):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller
        if "w" not in mode:
            return handle
        disk = self

        class Handle:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                data = bytes(data)
                if len(data) > disk.budget:
                    handle.write(data[: disk.budget])
                    disk.budget = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.budget -= len(data)
                return handle.write(data)

            def flush(self):
                handle.flush()

            def fileno(self):
                return handle.fileno()

        return Handle()


@pytest.mark.parametrize(
    "where", ["first-byte", "header", "tensor-data", "archive-end", "checksum-line", "fsync"]
)
def test_disk_full_during_a_save_leaves_every_checkpoint_intact(tmp_path, monkeypatch, where):
    first = _small_checkpoint(tmp_path, step=1)
    before = snapshot(tmp_path)
    size = first.stat().st_size
    trailer = len(first.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]) + 2
    budget = {
        "first-byte": 0,
        "header": 100,
        "tensor-data": size // 2,
        "archive-end": size - trailer - 10,
        "checksum-line": size - trailer // 2,
    }.get(where)
    if where == "fsync":

        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    else:
        monkeypatch.setattr(checkpoint_module, "open", _FillingDisk(budget), raising=False)
    with pytest.raises(OSError) as caught:
        _small_checkpoint(tmp_path, step=2)
    # The real cause, not torch's "unexpected pos" RuntimeError.
    assert caught.value.errno == errno.ENOSPC
    assert snapshot(tmp_path) == before  # no temporary file, nothing pruned, nothing changed
    monkeypatch.undo()
    assert load_checkpoint(first)["step"] == 1
    assert load_checkpoint(_small_checkpoint(tmp_path, step=2))["step"] == 2


class _FileSizeLimit:
    """A Progress that makes the kernel refuse big files (RLIMIT_FSIZE) from one step to another,
    so checkpoint writes fail for real half-way through, while small appends still work."""

    def __init__(self, trainer_dir, low_at, restore_at):
        import resource

        self.resource = resource
        self.low_at, self.restore_at = low_at, restore_at
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.checkpoints = trainer_dir / "checkpoints"
        self.intact_during_failure = None

    def start(self, total, initial):
        pass

    def update(self, record):
        resource = self.resource
        if record["step"] == self.low_at:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, self.saved[1]))
        if record["step"] == self.restore_at:
            self.restore()
            self.intact_during_failure = [step for step, _ in list_checkpoints(self.checkpoints)]

    def restore(self):
        self.resource.setrlimit(self.resource.RLIMIT_FSIZE, self.saved)

    def close(self):
        self.restore()


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_real_write_failure_mid_run_costs_a_log_line_not_the_run(
    straight, tmp_path, cache_dir, caplog
):
    run = tmp_path / "run"
    limit = _FileSizeLimit(run, low_at=3, restore_at=5)
    training_run = TrainingRun(tiny_config(**CONFIG), run, cache_dir=cache_dir, progress=limit)
    caplog.set_level(logging.ERROR, logger="blockllm")
    try:
        training_run.run()
    finally:
        limit.restore()
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1, failures
    assert "Could not write the checkpoint of step 4" in failures[0]
    assert "File too large" in failures[0]
    assert "step_00000002.pt is intact" in failures[0]
    assert "next checkpoint is tried at step 6" in failures[0]
    assert limit.intact_during_failure == [2]
    assert load_checkpoint(run / "checkpoints" / "step_00000006.pt")["step"] == 6
    assert exact(read_lines(run)) == exact(read_lines(straight))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_disk_full_at_the_final_save_is_an_error_then_resume_finishes(
    straight, tmp_path, cache_dir, capsys, monkeypatch
):
    from blockllm.app.training import loop

    real_save = loop.save_checkpoint

    def save(directory, step, payload, *, keep):
        if step == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(directory, step, payload, keep=keep)

    monkeypatch.setattr(loop, "save_checkpoint", save)
    run = tmp_path / "run"
    argv = ["pretrain", *FLAGS, "--output-dir", str(run), "--cache-dir", str(cache_dir)]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("blockllm: error: could not write the checkpoint of step 8 ")
    assert "No space left on device" in last
    assert "step_00000006.pt is intact; free some space and continue with --resume" in last

    monkeypatch.undo()  # space is back
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    assert exact(read_lines(run)) == exact(read_lines(straight))
    assert load_checkpoint(run / "checkpoints" / "step_00000008.pt")["step"] == 8


def test_fallback_never_hides_a_checkpoint_of_another_format(tmp_path):
    """A newer release's checkpoint is not "damaged": resuming must not silently go back past it."""
    path = _small_checkpoint(tmp_path, step=4)
    data = path.read_bytes().replace(
        b"blockllm-checkpoint format=2 ", b"blockllm-checkpoint format=9 "
    )
    path.write_bytes(data)
    _small_checkpoint(tmp_path, step=2)
    with pytest.raises(CheckpointVersionError, match=r"format 9 .*upgrade blockllm"):
        checkpoint_module.load_latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_metrics_line_that_cannot_be_written_stops_the_run_cleanly(
    straight, tmp_path, cache_dir, capsys, monkeypatch
):
    from blockllm.app.training.metrics import MetricsWriter

    real_log = MetricsWriter.log

    def log(self, record):
        if record["step"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_log(self, record)

    monkeypatch.setattr(MetricsWriter, "log", log)
    run = tmp_path / "run"
    argv = ["pretrain", *FLAGS, "--output-dir", str(run), "--cache-dir", str(cache_dir)]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "blockllm: error: [Errno 28] No space left on device"
    assert load_checkpoint(run / "checkpoints" / "step_00000004.pt")["step"] == 4

    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    assert exact(read_lines(run)) == exact(read_lines(straight))
