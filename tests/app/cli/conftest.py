import pytest
import torch


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, cache_dir):
    """Two short finished tiny runs (adamw and blockllm), shared read-only by several tests."""
    from blockllm.app.cli.main import main
    from tests.app.tiny import TINY_FLAGS

    root = tmp_path_factory.mktemp("finished")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for optimizer in ("adamw", "blockllm"):
            code = main([
                "pretrain", *TINY_FLAGS, "--optimizer", optimizer, "--max-steps", "4",
                "--eval-every", "2", "--save-every", "2", "--patience", "1",
                "--output-dir", str(root / optimizer), "--cache-dir", str(cache_dir),
            ])  # fmt: skip
            assert code == 0
    finally:
        torch.set_num_threads(previous)
    return {"adamw": root / "adamw", "blockllm": root / "blockllm"}
