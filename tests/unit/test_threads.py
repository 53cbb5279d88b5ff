"""pyddl's threads carry their names into the kernel, where top -H, perf and renice see them."""

import sys
import threading

import pytest

from pyddl.comm.engine import Engine
from pyddl.comm.multiring import StageThreads

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names are Linux's")]


def _kernel_name(_seq=None) -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as fh:
        return fh.read().strip()


def test_the_engine_and_stage_threads_have_their_names_in_the_kernel():
    engine, stages = Engine(wait_limit_s=10, name="pyddl-engine[a-long-name]"), StageThreads("[x]")
    try:
        assert engine.submit(_kernel_name, "probe").wait() == "pyddl-engine[a-"  # the kernel keeps 15 bytes
        seen, both = [], threading.Barrier(2, timeout=10)  # each job holds its own thread

        def job():
            both.wait()
            seen.append(_kernel_name())

        for done in stages.run([job, job]):
            assert done.wait(10)
        assert sorted(seen) == ["pyddl-stage1[x]", "pyddl-stage2[x]"]
        assert _kernel_name() != "pyddl-engine[a-"  # the caller's own name is left alone
    finally:
        engine.close()
        stages.close()
