"""The multiring's pipeline schedule on one thread (`_interleaved`), with stand-in messages.

Each task is a generator that "posts" a step (records it) and yields stand-in works whose
wait() records the wait: the schedule is then a log to check, with no process group.
"""

import random
import time

import pytest

from pyddl.comm.multiring import _interleaved

pytestmark = pytest.mark.timeout(30)


class _Work:
    def __init__(self, log, key):
        self.log, self.key = log, key

    def wait(self):
        self.log.append(("wait", *self.key))


def _run(n_stages, n_chunks, steps_of):
    """Run the schedule; return its log: ("post"|"wait"|"done", stage, chunk, step)."""
    log = []

    def task(s, c):
        for k in range(steps_of(s)):
            log.append(("post", s, c, k))
            yield [_Work(log, (s, c, k))]
        log.append(("done", s, c, None))

    _interleaved(n_stages, n_chunks, task)
    return log


@pytest.mark.parametrize("n_stages,n_chunks", [(2, 1), (4, 1), (4, 9), (6, 5), (2, 30)])
@pytest.mark.parametrize("steps", [1, 3])
def test_every_stage_runs_every_chunk_once_in_chunk_order_after_the_stage_before(n_stages, n_chunks, steps):
    log = _run(n_stages, n_chunks, lambda s: steps)
    done = [(s, c) for what, s, c, _ in log if what == "done"]
    assert sorted(done) == [(s, c) for s in range(n_stages) for c in range(n_chunks)]
    for s in range(n_stages):
        assert [c for t, c in done if t == s] == list(range(n_chunks))  # each stage in chunk order
    first_post = {}
    for i, (what, s, c, _) in enumerate(log):
        if what == "post":
            first_post.setdefault((s, c), i)
    for (s, c), i in first_post.items():
        if s > 0:  # a chunk enters a stage only after it has left the one before
            assert log.index(("done", s - 1, c, None)) < i
    # Every post is waited for, after it was made, before its task resumes.
    for i, (what, s, c, k) in enumerate(log):
        if what == "post":
            j = log.index(("wait", s, c, k))
            assert j > i
            assert all(not (e[0] == "post" and e[1:3] == (s, c) and e[3] == k + 1) for e in log[i:j])


def test_the_stages_of_different_chunks_are_in_flight_together():
    # The point of the pipeline: while chunk c is in a later stage, chunk c+1 is in an earlier one.
    log = _run(4, 8, lambda s: 1)
    outstanding, most = set(), 0
    for what, s, c, k in log:
        if what == "post":
            outstanding.add((s, c, k))
        elif what == "wait":
            outstanding.discard((s, c, k))
        most = max(most, len({s for s, _, _ in outstanding}))
    assert most == 4


def test_the_order_of_posts_and_waits_does_not_depend_on_timing():
    # Ranks agree on the order because it is fixed by the schedule alone: a rank whose messages
    # arrive in another order still posts and waits in the same sequence.
    def run_with_delays(seed):
        rng = random.Random(seed)
        log = []

        class Slow(_Work):
            def wait(self):
                time.sleep(rng.random() * 0.002)  # messages that take their own time
                super().wait()

        def task(s, c):
            for k in range(2 if s % 2 else 1):
                log.append(("post", s, c, k))
                yield [Slow(log, (s, c, k)), Slow(log, (s, c, k))]

        _interleaved(4, 6, task)
        return log

    assert run_with_delays(1) == run_with_delays(2)


def test_a_task_with_no_steps_finishes_at_once_and_lets_the_next_stage_start():
    log = _run(4, 3, lambda s: 0 if s == 1 else 1)
    assert [e for e in log if e[0] == "done" and e[1] == 1] == [("done", 1, c, None) for c in range(3)]
    assert sum(1 for e in log if e[0] == "done") == 12


def test_an_error_in_a_wait_reaches_the_caller():
    class Broken(_Work):
        def wait(self):
            raise RuntimeError("peer 3 is gone")

    def task(s, c):
        yield [Broken([], (s, c, 0))]

    with pytest.raises(RuntimeError, match="peer 3 is gone"):
        _interleaved(2, 2, task)
