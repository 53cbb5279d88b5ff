"""pyddl's threads carry their names into the kernel, where top -H, perf and renice see them."""

import sys
import threading

import pytest

from pyddl.comm.engine import Engine

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names are Linux's")]


def _kernel_name(_seq=None) -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as fh:
        return fh.read().strip()


def test_the_engine_thread_has_its_name_in_the_kernel():
    engine = Engine(wait_limit_s=10, name="pyddl-engine[a-long-name]")
    try:
        assert engine.submit(_kernel_name, "probe").wait() == "pyddl-engine[a-"  # the kernel keeps 15 bytes
        assert _kernel_name() != "pyddl-engine[a-"  # the caller's own name is left alone
    finally:
        engine.close()
