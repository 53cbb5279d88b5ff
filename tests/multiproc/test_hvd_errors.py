"""Errors found before any data moves leave the job usable, as in Horovod: a mismatch raised
on every rank, then the next collective works (core API and pyddl.torch). What breaks the
groups (a timeout) still fails every later call: tests/multiproc/test_errors.py checks it."""

import pytest
import torch

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _mismatch_then_work(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    seen = []
    # Core API: shapes differ (rank 0 sends 2 elements, the others 3): raised on every rank.
    try:
        pyddl.allreduce(torch.ones(2 if rank == 0 else 3))
        seen.append("no error")
    except pyddl.CollectiveMismatchError as err:
        seen.append("core mismatch" if "differs across ranks" in str(err) else str(err))
    seen.append(pyddl.allreduce(torch.tensor([rank + 1.0])).item())  # sum 1+2 = 3
    # A broadcast whose root differs, then a broadcast that matches.
    try:
        pyddl.broadcast(torch.tensor([rank]), root=rank)
        seen.append("no error")
    except pyddl.CollectiveMismatchError:
        seen.append("root mismatch")
    seen.append(pyddl.broadcast(torch.tensor([rank + 10]), root=1).item())  # rank 1's: 11
    # Horovod's API: a dtype mismatch is a HorovodInternalError (a RuntimeError) on every
    # rank, and Horovod's next allreduce (Average by default) then gives (1+2)/2 = 1.5.
    try:
        hvd.allreduce(torch.ones(2, dtype=torch.float32 if rank == 0 else torch.float64))
        seen.append("no error")
    except hvd.HorovodInternalError as err:
        seen.append("hvd mismatch" if isinstance(err.__cause__, pyddl.CollectiveMismatchError) else str(err))
    seen.append(hvd.allreduce(torch.tensor([rank + 1.0])).item())
    # Named async ops: the failed one's name is free again after synchronize() raised.
    h = hvd.allreduce_async(torch.ones(1 + rank), name="g")
    try:
        hvd.synchronize(h)
        seen.append("no error")
    except hvd.HorovodInternalError:
        seen.append("async mismatch")
    h = hvd.allreduce_async(torch.tensor([float(rank)]), name="g", op=hvd.Sum)
    # A duplicate name while "g" is in flight: an error at the call, on every rank.
    try:
        hvd.allreduce_async(torch.ones(1), name="g")
        seen.append("no error")
    except ValueError:
        seen.append("duplicate name")
    seen.append(hvd.synchronize(h).item())  # 0 + 1 = 1
    hvd.barrier()
    hvd.shutdown()
    return seen


def test_a_caught_mismatch_leaves_the_job_usable():
    want = ["core mismatch", 3.0, "root mismatch", 11, "hvd mismatch", 1.5, "async mismatch", "duplicate name", 1.0]
    assert run_ranks(_mismatch_then_work, 2) == [want, want]
