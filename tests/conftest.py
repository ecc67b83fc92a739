import os

# Tests never reach a model or dataset hub; a miss fails in seconds instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Test models are tiny and overhead-bound: one intra-op thread is as fast as two, and stays
    # fast when other processes share the cores (two OpenMP threads spinning against them made
    # steps about ten times slower on a shared 2-core runner). Restored afterwards.
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/model cache for the whole session."""
    from tests.app.tiny import cache_path

    return cache_path(tmp_path_factory)
