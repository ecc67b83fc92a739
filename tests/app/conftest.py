import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_logging():
    # main() configures the root logger (level INFO, a stderr handler). Left in place, the
    # handler and the level outlive the test, and later tests' INFO records pile up; pytest's
    # own capture handlers come and go per test phase, so only the ones main() added are removed.
    root = logging.getLogger()
    level, before = root.level, set(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler).__module__ == "logging":
            root.removeHandler(handler)
    root.setLevel(level)
