import pytest
import torch

from blockllm.app.training import RunDirError
from blockllm.app.training.checkpoint import save_checkpoint
from blockllm.app.training.rundir import check_run_dir, init_run_dir
from tests.app.tiny import snapshot, tiny_config


def test_new_directory_is_written_only_by_init(tmp_path):
    target = tmp_path / "run"
    run_dir = check_run_dir(target, tiny_config(), resume=False)
    assert not target.exists()
    init_run_dir(run_dir, tiny_config())
    assert (target / "config.json").is_file()


def test_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and holds no blockllm run"):
        check_run_dir(tmp_path, tiny_config(), resume=False)


def _finished_run(path, config):
    init_run_dir(check_run_dir(path, config, resume=False), config)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    save_checkpoint(path / "checkpoints", 1, {"x": torch.ones(1)}, keep=1)


def test_different_run_is_refused_and_untouched(tmp_path):
    _finished_run(tmp_path, tiny_config())
    before = snapshot(tmp_path)
    for resume in (False, True):
        with pytest.raises(
            RunDirError, match=r"holds a different run \(lr: 0.001 there, 0.002 now\)"
        ):
            check_run_dir(tmp_path, tiny_config(lr=2e-3), resume=resume)
    assert snapshot(tmp_path) == before


def test_same_run_needs_resume(tmp_path):
    _finished_run(tmp_path, tiny_config())
    with pytest.raises(RunDirError, match="pass --resume to continue it"):
        check_run_dir(tmp_path, tiny_config(), resume=False)
    run_dir = check_run_dir(tmp_path, tiny_config(save_every=1), resume=True)
    assert run_dir.resume_from.name == "step_00000001.pt"


def test_resume_needs_a_checkpoint(tmp_path):
    missing = tmp_path / "new"
    # A missing folder is named as such, not as a checkpoints/ folder inside it.
    with pytest.raises(RunDirError, match="nothing to resume") as caught:
        check_run_dir(missing, tiny_config(), resume=True)
    assert f"output directory {missing} does not exist" in str(caught.value)
    assert "checkpoints" not in str(caught.value)
    assert not missing.exists()
    init_run_dir(check_run_dir(tmp_path, tiny_config(), resume=False), tiny_config())
    with pytest.raises(RunDirError, match="nothing to resume"):
        check_run_dir(tmp_path, tiny_config(), resume=True)


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is not a directory"):
        check_run_dir(tmp_path / "file", tiny_config(), resume=False)


def test_resume_may_change_max_steps_and_nothing_else(tmp_path):
    _finished_run(tmp_path, tiny_config())
    run_dir = check_run_dir(tmp_path, tiny_config(max_steps=100), resume=True)
    assert run_dir.resume_from.name == "step_00000001.pt"
    with pytest.raises(RunDirError, match=r"max_steps: 6 there, 100 now.*add --resume to continue"):
        check_run_dir(tmp_path, tiny_config(max_steps=100), resume=False)
    with pytest.raises(RunDirError, match=r"holds a different run \(lr: 0.001 there, 0.002 now\)"):
        check_run_dir(tmp_path, tiny_config(max_steps=100, lr=2e-3), resume=True)
