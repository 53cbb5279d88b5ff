"""The background communication engine: one thread runs every collective, in call order.

Synchronous calls are submitted and waited on, so collectives issued from any thread (the
training loop, gradient hooks) reach the process groups in one global order on every rank,
which is what keeps ranks from mismatching. A CollectiveMismatchError is found by the
cross-rank check before any data moves and raised alike on every rank, so the groups stay
in step and the next collective runs. After any other failure (a timeout, a backend error,
a rank that died mid-transfer) the groups are in an unknown state, so every later call
fails at once with the original error.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from pyddl.errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError

__all__ = ["Engine", "Handle"]


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


class Engine:
    """A FIFO executor on one daemon thread with a per-call sequence number."""

    def __init__(self, wait_limit_s: float, name: str = "pyddl-engine"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wait_limit_s = wait_limit_s
        self._broken: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], describe: str) -> Handle:
        future: Future = Future()
        self._queue.put((fn, future))
        return Handle(future, describe, self._wait_limit_s)

    def run(self, fn: Callable[[], Any], describe: str) -> Any:
        if threading.current_thread() is self._thread:
            return fn()  # a job that itself issues collectives (e.g. the auto tuner)
        return self.submit(fn, describe).wait()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run_one(*item)
            # Nothing of a finished job stays referenced here until the next one arrives: not
            # its tensors, nor a result holding process groups (their threads stop with them).
            del item

    def _run_one(self, fn: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if self._broken is not None:
            future.set_exception(
                CollectiveError(
                    "pyddl: an earlier collective failed, so this job's process groups "
                    f"cannot be trusted; restart the job. The first failure: {self._broken}"
                )
            )
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            if not isinstance(exc, CollectiveMismatchError):  # raised before data moved
                self._broken = exc
            future.set_exception(exc)

    def close(self) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
