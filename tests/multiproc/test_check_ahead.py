"""One cross-rank check covers the calls queued behind it (guard.exchange's `ahead`): when
gradient buckets queue up behind a busy network, every rank compares the whole queue at once
instead of paying an allgather per bucket, and the last call it covered checks the calls queued
since then in the background (guard.AheadCheck). It must keep every guarantee of the check: a
mismatch anywhere in the queue still raises on every rank at that call, and a rank that
joins while calls are queued still serves them."""

import threading

import pytest
import torch

from harness import hold_engine, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(90)]


def _queued(rank, world, n, bad):
    import pyddl

    pyddl.init()
    comm = pyddl.world()
    release = hold_engine(comm)
    handles = []
    for i in range(n):
        shape = (i + 2,) if not (rank == 1 and i == bad) else (i + 3,)
        handles.append(comm.allreduce_async_(torch.full(shape, float((rank + 1) * (i + 1)))))
    release.set()
    out = []
    for h in handles:
        try:
            out.append(h.wait().tolist())
        except pyddl.CollectiveMismatchError as exc:
            out.append(f"mismatch: {exc}")
    after = comm.allreduce(torch.tensor([float(rank)])).item()  # the job goes on
    return out, comm.exchanges, after


def test_queued_calls_are_checked_together_with_the_same_results():
    n = 10
    for out, exchanges, after in run_ranks(_queued, 2, n, -1):
        # Ranks contribute (rank + 1) x (i + 1): the sum is 3 x (i + 1) in each of i + 2 places.
        assert out == [[3.0 * (i + 1)] * (i + 2) for i in range(n)]
        # The first call's check covers the next AHEAD = 7; the eighth, the last it covered,
        # checks the ninth and tenth in the background while it moves its data; the tenth does
        # the same for an empty queue; the closing allreduce is checked alone: 4 exchanges for
        # 11 collectives, of which only 2 keep a call waiting.
        assert exchanges == 4
        assert after == 1.0


def test_a_mismatch_in_the_queue_raises_at_that_call_on_every_rank():
    n, bad = 6, 3
    results = run_ranks(_queued, 2, n, bad)
    assert results[0][0][bad] == results[1][0][bad]  # the same error, the same collective number
    for rank_out, exchanges, after in results:
        for i, got in enumerate(rank_out):
            if i == bad:
                assert got.startswith("mismatch:") and "differs across ranks" in got, got
                assert "ranks 0: allreduce(float32[5]" in got and "ranks 1: allreduce(float32[6]" in got, got
            else:
                assert got == [3.0 * (i + 1)] * (i + 2)
        assert after == 1.0
        # The first call's check stops short of the bad one, and so does the background check
        # of the call before it; the bad one checks itself, the next one covers the last, which
        # checks behind it in the background; the closing allreduce is checked alone.
        assert exchanges == 6


def _join_with_a_queue(rank, world):
    import pyddl

    pyddl.init()
    comm = pyddl.world()
    release = hold_engine(comm)
    calls = 2 if rank == 0 else 3  # rank 0 runs out of data one call early and joins
    handles = [comm.allreduce_async_(torch.full((4,), float(rank + 1) * (i + 1))) for i in range(calls)]
    release.set()
    sums = [h.wait().tolist() for h in handles]
    last = comm.join()
    return sums, last


def test_a_rank_joining_behind_queued_calls_serves_the_rest():
    results = run_ranks(_join_with_a_queue, 2)
    assert results[0][0] == [[3.0] * 4, [6.0] * 4]
    assert results[1][0] == [[3.0] * 4, [6.0] * 4, [6.0] * 4]  # rank 0 gave zeros for the third
    assert results[0][1] == results[1][1] == 1


def _queued_while_running(rank, world):
    import pyddl
    from pyddl.comm.guard import OpInfo

    pyddl.init()
    comm = pyddl.world()
    release, started, running = hold_engine(comm), threading.Event(), threading.Event()
    # The first call's check covers the second; the first then keeps the engine busy until
    # three more calls are queued behind the second, the last call that check vouched for.
    # They are queued once the first call runs, so after its check on every rank.
    first = comm.run(OpInfo("slow", "first"), lambda seq: (started.set(), running.wait(30)), asynchronous=True)
    handles = [comm.allreduce_async_(torch.full((2,), float(rank + 1)))]
    release.set()
    started.wait(30)
    handles += [comm.allreduce_async_(torch.full((3,), float((rank + 1) * i))) for i in (2, 3, 4)]
    running.set()
    first.wait()
    sums = [h.wait().tolist() for h in handles]
    return sums, comm.exchanges


def test_calls_queued_while_the_last_checked_one_waits_are_checked_in_the_background():
    for sums, exchanges in run_ranks(_queued_while_running, 2):
        assert sums == [[3.0] * 2, [6.0] * 3, [9.0] * 3, [12.0] * 3]
        # The first call's check, the background check posted by the second (which covers the
        # three queued behind it), and the one the last posts for an empty queue. A call left
        # unchecked by the background check would have added an exchange of its own.
        assert exchanges == 3


def _switch_off_behind_a_background_check(rank, world):
    import pyddl

    pyddl.init()
    comm = pyddl.world()
    release = hold_engine(comm)
    handles = [comm.allreduce_async_(torch.full((2,), float(rank + 1))) for _ in range(3)]
    release.set()
    sums = [h.wait().tolist() for h in handles]  # the third posted a background check
    comm.set_check(False)
    off = comm.allreduce(torch.tensor([float(rank)])).item()
    comm.set_check(True)
    on = comm.allreduce(torch.tensor([float(rank + 1)])).item()
    return sums, off, on, comm.exchanges


def test_switching_the_check_off_and_on_behind_a_background_check():
    for sums, off, on, exchanges in run_ranks(_switch_off_behind_a_background_check, 2):
        assert sums == [[3.0] * 2] * 3 and off == 1.0 and on == 3.0
        # First call (covers the other two), background check of the third, set_check twice,
        # the last allreduce.
        assert exchanges == 5
