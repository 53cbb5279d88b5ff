import os
import sys

import pytest

# Tests spawn worker processes that import these helpers by module name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (-n 2 --dist loadgroup) the emulated clusters of tests/root run one at a
    # time on one worker: they share the 10.213.0.0/16 range and clean up each other's leftovers.
    # First, so that xdist's own hook finds the marks when it turns them into node ids (which
    # it does only under pytest < 9: see pyproject.toml).

    root = os.path.join(os.path.dirname(__file__), "root")
    for item in items:
        if str(item.path).startswith(root + os.sep):
            item.add_marker(pytest.mark.xdist_group("netns"))
