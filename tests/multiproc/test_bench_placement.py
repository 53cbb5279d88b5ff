"""`pyddl bench step` counts the ranks that share a core from every rank's machine and CPUs."""

import os

import pytest

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _ranks_per_core(rank, world, cpus):
    import os

    import pyddl
    from pyddl.bench.step import job_ranks_per_core

    os.sched_setaffinity(0, cpus[rank])
    pyddl.init(timeout_s=60)
    try:
        return job_ranks_per_core()
    finally:
        pyddl.shutdown()


def test_ranks_per_core_from_every_ranks_affinity():
    every = sorted(os.sched_getaffinity(0))
    one = {every[0]}
    # All three ranks on one core.
    assert run_ranks(_ranks_per_core, 3, [one, one, one]) == [3.0, 3.0, 3.0]
    # One rank pinned, two free: they share every core, so the ranks' CPU lists differ in length.
    expected = max(1.0, 3 / len(every))
    assert run_ranks(_ranks_per_core, 3, [one, set(every), set(every)]) == [expected] * 3
