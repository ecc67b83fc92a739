import pickle
import random

import pytest
import torch

from blockllm.app.training import CheckpointError
from blockllm.app.training.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_round_trip_with_weights_only(tmp_path):
    payload = {"model": {"w": torch.arange(3.0)}, "config": {"lr": 1e-3, "name": "x"}, "none": None}
    path = save_checkpoint(tmp_path, 5, payload, keep=2)
    assert path.name == "step_00000005.pt"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 5
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["config"] == {"lr": 1e-3, "name": "x"}


def test_keeps_the_last_few_and_leaves_no_temp_files(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt", "step_00000004.pt"]


def test_failed_save_keeps_previous_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)}, keep=1)
    before = (tmp_path / "step_00000001.pt").read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # by Python version
        save_checkpoint(tmp_path, 2, {"x": lambda: None}, keep=1)  # not picklable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]
    assert (tmp_path / "step_00000001.pt").read_bytes() == before


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"x": torch.ones(100)}, keep=1)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"step_00000003.pt is corrupt or unreadable"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "step_00000001.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="not a blockllm run checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"kind": "blockllm-run-checkpoint", "format": 1, "evil": print}, path)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(path)


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), random.random())
    torch.rand(10)
    random.random()
    path = save_checkpoint(tmp_path, 1, {"rng": state}, keep=1)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
