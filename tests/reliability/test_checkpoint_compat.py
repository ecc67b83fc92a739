"""Checkpoints of the previous release load; checkpoints of a newer one fail with a versioned message.

``data/release-0.1.0-format1.ckpt`` was written by blockllm 0.1.0's own ``save_checkpoint`` (format
1: a bare ``torch.save`` archive, no checksum), holding the state of a 3-step BlockLLM run of
``nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))`` (seed 0, lr 1e-2, sparsity 0.5,
interval trigger, patience 1) in the layout of a TrainingRun checkpoint. A whole run directory of
0.1.0 is recreated by rewriting a current checkpoint in format 1, exactly as 0.1.0 wrote it.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from blockllm import BlockLLM, StateDictMismatchError
from blockllm.app.cli.main import main
from blockllm.app.training import RunConfig, TrainingRun
from blockllm.app.training.checkpoint import (
    CHECKPOINT_KIND,
    load_checkpoint,
    restore_rng_state,
)
from blockllm.app.training.run_errors import CheckpointVersionError
from tests.app.tiny import snapshot, tiny_config
from tests.reliability.helpers import COUNTS, exact, read_lines

RELEASE_0_1_0 = Path(__file__).parent / "data" / "release-0.1.0-format1.ckpt"


def _release_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_a_checkpoint_written_by_release_0_1_0_loads(tmp_path, caplog):
    path = tmp_path / "step_00000003.pt"
    shutil.copy(RELEASE_0_1_0, path)
    caplog.set_level(logging.INFO, logger="blockllm")
    record = load_checkpoint(path)
    assert (record["kind"], record["format"], record["step"]) == (CHECKPOINT_KIND, 1, 3)
    assert "format-1 checkpoint (blockllm 0.1.0) without a checksum" in caplog.text
    assert RunConfig.from_dict(record["config"]).max_steps == 6
    restore_rng_state(record["rng"])

    model = _release_model()
    model.load_state_dict(record["model"])
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, trigger="interval",
                   patience=1)  # fmt: skip
    try:
        opt.load_state_dict(record["optimizer"])
    except StateDictMismatchError as exc:
        # Allowed by the compatibility rule only as a versioned, readable refusal.
        assert re.search(r"format_version \d+", str(exc)), str(exc)
        COUNTS["previous-release checkpoints refused with a versioned message"] += 1
        return
    assert opt.selected == ["0.weight", "0.bias", "2.weight", "2.bias"][: len(opt.selected)]
    assert opt.num_selected <= opt.budget == 29
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scheduler.load_state_dict(record["scheduler"])
    # It keeps training from there.
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    opt.step(loss=loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    COUNTS["previous-release checkpoints loaded"] += 1


def _as_release_0_1_0(path: Path) -> None:
    """Rewrite a current checkpoint the way 0.1.0 wrote it: format 1, no new keys, no checksum."""
    record = load_checkpoint(path)
    for key in ("blockllm_version", "skipped_steps"):
        record.pop(key)
    record["format"] = 1
    torch.save(record, path)


def test_a_run_of_release_0_1_0_resumes_exactly(tmp_path, cache_dir):
    config = tiny_config(max_steps=6, eval_every=3, save_every=3)
    TrainingRun(config, tmp_path / "straight", cache_dir=cache_dir).run()
    run = tmp_path / "old"
    shutil.copytree(tmp_path / "straight", run)
    (run / "checkpoints" / "step_00000006.pt").unlink()
    _as_release_0_1_0(run / "checkpoints" / "step_00000003.pt")
    TrainingRun(config, run, resume=True, cache_dir=cache_dir).run()
    assert exact(read_lines(run)) == exact(read_lines(tmp_path / "straight"))
    # The continued run writes the current format.
    assert load_checkpoint(run / "checkpoints" / "step_00000006.pt")["format"] == 2
    COUNTS["previous-release checkpoints loaded"] += 1


def _from_a_newer_release(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "checksum-line":
        data = re.sub(rb"format=2 blockllm=\S+ ", b"format=3 blockllm=0.9.0 ", data)
        path.write_bytes(data)
    else:  # a future container without our trailer, whose record says format 3
        record = load_checkpoint(path)
        record["format"], record["blockllm_version"] = 3, "0.9.0"
        torch.save(record, path)


@pytest.mark.parametrize("how", ["checksum-line", "record"])
def test_a_checkpoint_of_a_newer_format_fails_with_a_versioned_message(tmp_path, how):
    from blockllm.app.training.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path, 5, {"x": torch.ones(3)}, keep=1)
    _from_a_newer_release(path, how)
    with pytest.raises(CheckpointVersionError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "uses checkpoint format 3 (written by blockllm 0.9.0)" in message
    assert re.search(r"this blockllm \S+ reads formats 1 and 2: upgrade blockllm", message)


def test_resuming_from_a_newer_format_is_exit_2_and_touches_nothing(tmp_path, cache_dir, capsys):
    config = tiny_config(max_steps=3, save_every=3)
    TrainingRun(config, tmp_path, cache_dir=cache_dir).run()
    _from_a_newer_release(tmp_path / "checkpoints" / "step_00000003.pt", "checksum-line")
    before = snapshot(tmp_path)
    code = main(["pretrain", "--output-dir", str(tmp_path), "--resume", "--progress", "off",
                 "--cache-dir", str(cache_dir)])  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith("blockllm: error: checkpoint ")
    assert "uses checkpoint format 3 (written by blockllm 0.9.0)" in last
    assert snapshot(tmp_path) == before


def test_optimizer_state_of_a_newer_format_is_refused_by_version(tmp_path, cache_dir):
    config = tiny_config(max_steps=3, save_every=3)
    TrainingRun(config, tmp_path, cache_dir=cache_dir).run()
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    record = load_checkpoint(path)
    record["optimizer"]["blockllm"]["format_version"] = 99
    record.pop("blockllm_version")
    record.pop("skipped_steps")
    record["format"] = 1
    torch.save(record, path)
    training_run = TrainingRun(config, tmp_path, resume=True, cache_dir=cache_dir)
    with pytest.raises(Exception, match=r"format_version 99 cannot be read.*format_version \d"):
        training_run.setup()
    training_run.cleanup()
