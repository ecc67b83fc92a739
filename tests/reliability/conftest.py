import pytest
import torch

from tests.app.tiny import cache_path
from tests.reliability.helpers import COUNTS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return cache_path(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are overhead-bound: one thread is as fast as two and stays fast when other
    # processes share the cores (two threads each then slow down about tenfold).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.section("blockllm reliability counts")
    for name in sorted(COUNTS):
        terminalreporter.write_line(f"{name:<52}{COUNTS[name]:>10,}")
