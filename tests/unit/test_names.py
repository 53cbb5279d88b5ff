"""Matching by name without ranks: the agreement rule (comm/names.py) and the engine's queue
of named jobs (comm/engine.py)."""

import threading

import pytest

from pyddl.comm.engine import Engine, Reorder
from pyddl.comm.names import agree, stuck

pytestmark = pytest.mark.timeout(30)


def test_agree_takes_the_lowest_ranks_first_name_that_every_rank_has():
    assert agree([(["a", "b", "c"], False), (["c", "b", "a"], False)]) == "a"
    assert agree([(["a", "b", "c"], False), (["c", "b"], False)]) == "b"
    assert agree([(["a"], False), (["c"], False)]) is None
    assert agree([(["x", "y"], True), (["y"], False), (["z", "y"], False)]) == "y"


def test_a_joined_rank_takes_any_name():
    assert agree([None, (["b", "a"], False), (["a", "b"], False)]) == "b"
    assert agree([None, None]) is None
    assert not stuck([None, (["a"], True)])


def test_stuck_when_the_closed_offers_share_no_name():
    # Horovod's named op on rank 0 against an unnamed one on rank 1: never matched.
    assert stuck([(["a"], False), ([], True)])
    assert stuck([(["a"], True), (["b"], True)])
    # An open offer may still receive the name: wait.
    assert not stuck([(["a"], True), (["b"], False)])
    assert not stuck([(["a"], False), (["b"], False)])
    assert not stuck([(["a", "b"], True), (["b", "c"], True), (["d"], False)])


def _engine_with(jobs):
    """An engine whose thread is held by a first job until `release` is set, with `jobs`
    (key, fn) queued behind it; returns (engine, release, handles)."""
    engine = Engine(wait_limit_s=10)
    release = threading.Event()
    first = engine.submit(lambda seq: release.wait(), "hold", "hold")
    handles = [engine.submit(fn, key or "unnamed", key) for key, fn in jobs]
    return engine, release, [first, *handles]


def test_ready_names_stop_at_the_first_unnamed_job():
    engine, release, _ = _engine_with([("a", lambda s: s), ("b", lambda s: s), (None, lambda s: s), ("c", lambda s: s)])
    try:
        assert engine.ready_names() == (["hold", "a", "b"], True)
    finally:
        release.set()
        engine.close()


def test_reorder_runs_the_agreed_job_first_with_the_next_number():
    ran = []
    asked = []

    def wants_b(seq):
        if not asked:
            asked.append(seq)
            raise Reorder("b")  # as a job does when the ranks agreed on "b"
        ran.append(("a", seq))
        return "a"

    def plain(name):
        def fn(seq):
            ran.append((name, seq))
            return name
        return fn

    engine, release, handles = _engine_with([("a", wants_b), ("b", plain("b")), (None, plain("u"))])
    release.set()
    assert [h.wait() for h in handles[1:]] == ["a", "b", "u"]
    assert ran == [("b", 2), ("a", 3), ("u", 4)] and asked == [2]
    engine.close()


def test_a_name_in_flight_is_refused_until_its_job_ends():
    engine, release, handles = _engine_with([("a", lambda s: s)])
    with pytest.raises(ValueError, match="'a' is still in flight"):
        engine.submit(lambda s: s, "again", "a")
    release.set()
    handles[1].wait()
    assert engine.submit(lambda s: "again", "again", "a").wait() == "again"
    engine.close()


def test_the_engine_runs_first_the_name_that_ran_next_last_time():
    """Horovod's response cache by another route: a steady loop's names run in the order the
    ranks agreed on before, whatever this rank's submission order, without negotiating."""
    ran = []

    def job(name):
        def fn(seq):
            ran.append(name)
        return fn

    engine = Engine(wait_limit_s=10)
    engine.by_name = True
    for order in (["a", "b", "c"], ["c", "b", "a"]):
        release = threading.Event()
        hold = engine.submit(lambda seq: release.wait(), "hold", "hold")
        handles = [engine.submit(job(n), n, n) for n in order]
        release.set()
        for h in [hold, *handles]:
            h.wait()
    engine.by_name = False  # without the check to catch a wrong guess: submission order
    release = threading.Event()
    handles = [engine.submit(lambda seq: release.wait(), "hold", "hold")] + [engine.submit(job(n), n, n) for n in "cba"]
    release.set()
    for h in handles:
        h.wait()
    assert ran == list("abc") + list("abc") + list("cba")
    engine.close()
