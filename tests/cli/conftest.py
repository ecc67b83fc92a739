import pytest
import torch

from tests.train.tiny import cache_path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return cache_path(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny test model is overhead-bound: one thread is as fast as two, and stays fast when
    # other processes share the cores (two threads each then slow down tenfold).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, cache_dir):
    """Two short finished tiny runs (adamw and blockllm), shared read-only by several tests."""
    from blockllm.cli.main import main
    from tests.train.tiny import TINY_FLAGS

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
