"""The background communication engine: one thread runs every collective of a communicator.

Synchronous calls are submitted and waited on, so collectives issued from any thread (the
training loop, gradient hooks) reach the process groups in one order on every rank, which is
what keeps ranks from mismatching. Unnamed jobs run in submission order. A named job (Horovod's
`name=`) may run before the named jobs submitted ahead of it, up to the first unnamed one: when
the cross-rank check finds the ranks at different names, they agree on one (comm/names.py) and
the job raises `Reorder`, which moves the agreed job to the front on every rank. The engine
then remembers which name ran after which (Horovod's response cache, by another route) and
next time runs that one first where it can, so a loop whose ranks submit in different but
steady orders stops negotiating.

A CollectiveMismatchError is found by the cross-rank check before any data moves and raised
alike on every rank, so the groups stay in step and the next collective runs. After any other
failure (a timeout, a backend error, a rank that died mid-transfer) the groups are in an
unknown state, so every later call fails at once with the original error.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from pyddl.comm.osname import name_this_thread
from pyddl.errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError

__all__ = ["Engine", "Handle", "Reorder"]

# How long a rank waits for the name that ran next last time before running the name at the
# front instead: what a change in a loop's order costs, once.
PREDICT_WAIT_S = 0.05
# Names remembered (by the name before them); a loop of fresh names clears it now and then.
_MAX_REMEMBERED = 4096


class Handle:
    """The result of an asynchronous collective: `wait()` returns it, `done()` polls."""

    def __init__(self, future: Future, describe: str, wait_limit_s: float):
        self._future = future
        self._describe = describe
        self._wait_limit_s = wait_limit_s

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        """Call fn(result, error) on the engine thread when the collective ends."""
        self._future.add_done_callback(lambda f: fn(None, f.exception()) if f.exception() else fn(f.result(), None))

    def wait(self) -> Any:
        """Block until the collective finished; return its result or raise its error."""
        try:
            return self._future.result(timeout=self._wait_limit_s)
        except TimeoutError:
            if self._future.done():
                raise
            # The engine itself is stuck (each collective has its own timeout, so this
            # should not happen); fail rather than hang.
            raise CollectiveTimeoutError(
                f"pyddl: {self._describe} did not complete within {self._wait_limit_s:g} s"
            ) from None


class Reorder(Exception):
    """Raised by a job before it moved any data: run the queued job named `key` first."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _Job:
    __slots__ = ("fn", "future", "key", "fp", "part", "verified")

    def __init__(self, fn: Callable[[int], Any], future: Future, key: str | None, fp: int | None, part=None):
        self.fn, self.future, self.key, self.fp, self.part = fn, future, key, fp, part
        self.verified = False  # compared across ranks by the check of a job ahead of it


class Engine:
    """An executor on one daemon thread; each job gets its collective number when it runs.

    Jobs are numbered in the order they run, not the order they were submitted, so a job
    that every rank agreed to run early has the same number on every rank.
    """

    def __init__(self, wait_limit_s: float, name: str = "pyddl-engine"):
        self._jobs: collections.deque = collections.deque()  # the running job stays at [0]
        self._cond = threading.Condition()
        self._names: set[str] = set()  # the keys of the named jobs queued or running
        # Speculating on names needs the check that catches a wrong guess: the communicator
        # keeps this equal to "check on and more than one rank".
        self.by_name = False
        self._after: dict[str, str] = {}  # name -> the name that ran next, identical on every rank
        self._last: str | None = None  # the last name that ran
        self._agreed = False  # the job at the front is the one the ranks agreed on: keep it there
        self.submitted = 0  # jobs ever submitted: negotiation waits for it to change
        self.seq = 0  # the number of the job running or last run
        self._wait_limit_s = wait_limit_s
        self._broken: BaseException | None = None
        self._nested = 0  # jobs run from inside the running one (run() on the engine thread)
        # Whether the running job was compared across ranks ahead of time (see ahead()).
        self.running_verified = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[int], Any], describe: str, key: str | None = None,
               fp: int | None = None, part=None) -> Handle:
        """Queue `fn(seq)`; `key` names it for matching by name (None: matched by order).
        `fp`: the fingerprint of an unnamed checked call, which a check ahead of it may cover.
        `part`: a fusion.Part, if the job may be taken into a running job's pass (take_verified).

        Raises:
            ValueError: a job of that name is still queued or running (Horovod's rule: the
                ranks could not tell the two apart).
        """
        future: Future = Future()
        with self._cond:
            if key is not None:
                if key in self._names:
                    raise ValueError(f"a collective named {key!r} is still in flight on this rank; names must "
                                     "be unique until their collective ends: wait for it, or pick another name")
                self._names.add(key)
            self._jobs.append(_Job(fn, future, key, None if key is not None else fp, part))
            self.submitted += 1
            self._cond.notify_all()
        return Handle(future, describe, self._wait_limit_s)

    def run(self, fn: Callable[[int], Any], describe: str, key: str | None = None, fp: int | None = None,
            part=None) -> Any:
        """Submit `fn(seq)` and wait for it; run it at once from a job on the engine thread."""
        if threading.current_thread() is self._thread:
            self.seq += 1  # a job that itself issues collectives (e.g. the auto tuner)
            self.running_verified = False
            self._nested += 1
            try:
                return fn(self.seq)
            finally:
                self._nested -= 1
        return self.submit(fn, describe, key, fp, part).wait()

    def ahead(self, limit: int) -> list[_Job]:
        """(Engine thread.) The jobs queued right behind the running one, up to `limit`,
        stopping at the first without a fingerprint (named, unchecked, or the end).

        These jobs run next, in this order, on this rank: unnamed jobs are never overtaken, and
        jobs are only appended behind them. So a check that finds every rank with the same
        jobs ahead can vouch for them (verify), and each skips its own exchange.
        """
        jobs = []
        with self._cond:
            for i in range(1, min(len(self._jobs), limit + 1)):
                job = self._jobs[i]
                if job is None or job.fp is None:
                    break
                jobs.append(job)
        return jobs

    def verify(self, jobs: list[_Job]) -> None:
        """(Engine thread.) Mark `jobs` (from ahead()) as checked across ranks; the running job
        among them (a check settled as it starts) counts as checked at once."""
        with self._cond:
            for job in jobs:
                job.verified = True
            if self._jobs and any(job is self._jobs[0] for job in jobs):
                self.running_verified = True

    def next_verified(self) -> bool:
        """(Engine thread.) Whether the job right behind the running one is already checked.
        The same on every rank: a job is only marked where every rank has it at that place."""
        with self._cond:
            return len(self._jobs) > 1 and self._jobs[1] is not None and self._jobs[1].verified

    def take_verified(self, key: tuple) -> list[_Job]:
        """(Engine thread.) Remove and return the checked jobs queued right behind the running
        one whose part has `key`, up to the first that is not. The same jobs on every rank: a
        job is only marked where every rank has it at that place, and the key is part of its
        fingerprint. The caller runs their parts and ends each with settle()."""
        taken = []
        with self._cond:
            if self._nested:
                return taken  # the queue behind belongs to the job that called this one
            while (len(self._jobs) > 1 and self._jobs[1] is not None and self._jobs[1].verified
                   and self._jobs[1].part is not None and self._jobs[1].part.key == key):
                taken.append(self._jobs[1])
                del self._jobs[1]
        return taken

    def settle(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        """(Engine thread.) End a job taken by take_verified with its result or error."""
        if job.future.set_running_or_notify_cancel():
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

    def ready_names(self) -> tuple[list[str], bool]:
        """(Engine thread.) The names of the named jobs at the front of the queue, the running
        one first, up to the first unnamed job; and whether one follows them (no later name
        can join this list: unnamed jobs are matched by order, so none is overtaken)."""
        names = []
        with self._cond:
            for job in self._jobs:
                if job is None or job.key is None:
                    return names, True
                names.append(job.key)
        return names, False

    def wait_for_submission(self, seen: int, timeout_s: float) -> None:
        """(Engine thread.) Wait until a job is submitted after the count `seen`, or timeout_s."""
        with self._cond:
            self._cond.wait_for(lambda: self.submitted != seen, timeout_s)

    def skip_to(self, seq: int) -> None:
        """(Engine thread.) Continue numbering after `seq` (join(): ranks left at different numbers)."""
        self.seq = max(self.seq, seq)

    def _loop(self) -> None:
        name_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs)
                if self.by_name and not self._agreed:
                    self._predict()
                job = self._jobs[0]
            if job is None:
                return
            if self._run_one(job):
                with self._cond:
                    self._jobs.popleft()
                    self._names.discard(job.key)
            # Nothing of a finished job stays referenced here until the next one arrives: not
            # its tensors, nor a result holding process groups (their threads stop with them).
            del job

    def _predict(self) -> None:
        """(Under the lock.) Move the name that ran after the last one last time to the front,
        waiting up to PREDICT_WAIT_S for it to be submitted. Only a guess: the cross-rank check
        catches a wrong one, so it need not hold on every rank, only usually."""
        want = self._after.get(self._last) if self._last is not None else None
        if want is None or self._jobs[0] is None or self._jobs[0].key in (None, want):
            return
        deadline = time.monotonic() + PREDICT_WAIT_S
        while True:
            for i, job in enumerate(self._jobs):
                if job is None or job.key is None:
                    return  # the name would overtake an unnamed job: never
                if job.key == want:
                    del self._jobs[i]
                    self._jobs.appendleft(job)
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _ran(self, key: str | None, ok: bool) -> None:
        """Remember the order names ran in. Every rank runs the same jobs in the same order and
        fails the same ones, so every rank remembers the same."""
        self._agreed = False
        if not ok:
            self._last = None
        elif key is not None:
            if self._last is not None:
                if len(self._after) >= _MAX_REMEMBERED:
                    self._after.clear()
                self._after[self._last] = key
            self._last = key

    def _run_one(self, job: _Job) -> bool:
        """Run the job at the front; False when it raised Reorder and stays queued."""
        future = job.future
        if not future.running() and not future.set_running_or_notify_cancel():
            return True
        if self._broken is not None:
            future.set_exception(
                CollectiveError(
                    "pyddl: an earlier collective failed, so this job's process groups "
                    f"cannot be trusted; restart the job. The first failure: {self._broken}"
                )
            )
            return True
        self.seq += 1
        self.running_verified = job.verified
        try:
            result = job.fn(self.seq)
        except Reorder as order:
            self.seq -= 1
            self._promote(order.key)
            self._agreed = True
            return False
        except BaseException as exc:
            if not isinstance(exc, CollectiveMismatchError):  # raised before data moved
                self._broken = exc
            self._ran(job.key, False)
            future.set_exception(exc)
            return True
        self._ran(job.key, True)
        future.set_result(result)
        return True

    def _promote(self, key: str) -> None:
        with self._cond:  # the key came from this rank's own ready_names(), so it is queued
            job = next(j for j in self._jobs if j is not None and j.key == key)
            self._jobs.remove(job)
            self._jobs.appendleft(job)

    def close(self) -> None:
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
