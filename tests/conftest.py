import os
import sys

# Tests spawn worker processes that import these helpers by module name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (-n 2 --dist loadgroup) the emulated clusters of tests/root run one at a
    # time on one worker: they share the 10.213.0.0/16 range and clean up each other's leftovers.
    import pytest

    root = os.path.join(os.path.dirname(__file__), "root")
    for item in items:
        if str(item.path).startswith(root + os.sep):
            item.add_marker(pytest.mark.xdist_group("netns"))
