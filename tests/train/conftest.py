import pytest

from tests.train.tiny import cache_path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return cache_path(tmp_path_factory)
