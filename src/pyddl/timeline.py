"""A Chrome-trace timeline of what each rank spends its time on (PYDDL_TIMELINE=file.json).

Each rank appends events to `<file>.rank<N>` as it goes (so a crash keeps what happened up to
it); at `pyddl.shutdown()` rank 0 merges the ranks' files into `<file>`, one trace process
per rank. Open it in chrome://tracing or https://ui.perfetto.dev.
"""

from __future__ import annotations

import json
import os
import threading
import time

__all__ = ["Timeline"]


class Timeline:
    """Event recorder for one rank; all methods are cheap no-ops when disabled."""

    def __init__(self, path: str | None, rank: int, world_size: int = 1):
        self.path, self.rank, self.world_size = path, rank, world_size
        self.enabled = bool(path)
        self._lock = threading.Lock()
        self._fh = None
        if self.enabled:
            self._fh = open(f"{path}.rank{rank}", "w")

    @staticmethod
    def now_us() -> float:
        return time.perf_counter_ns() / 1000.0

    def _write(self, event: dict) -> None:
        event.setdefault("pid", self.rank)
        with self._lock:
            if self._fh is not None:
                self._fh.write(json.dumps(event) + "\n")

    def span(self, name: str, start_us: float, end_us: float, lane: str, args: dict | None = None) -> None:
        """Record a complete event [start, end) on `lane` (e.g. "compute", "comm")."""
        if self.enabled:
            self._write({"name": name, "ph": "X", "ts": start_us, "dur": max(0.0, end_us - start_us),
                         "tid": lane, "args": args or {}})

    def instant(self, name: str, lane: str, args: dict | None = None) -> None:
        if self.enabled:
            self._write({"name": name, "ph": "i", "s": "t", "ts": self.now_us(), "tid": lane, "args": args or {}})

    def start(self, path: str) -> None:
        """Record from now on into `path` (this rank's file `<path>.rank<N>`)."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
            self.path, self.enabled = path, True
            self._fh = open(f"{path}.rank{self.rank}", "w")

    def stop(self) -> None:
        """Stop recording (after close() and merge())."""
        self.close()
        self.enabled = False

    def close(self) -> None:
        """Flush and close this rank's file."""
        if not self.enabled:
            return
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def merge(self) -> None:
        """Combine every rank's file into `path` (on one rank, after every rank's close())."""
        if not self.enabled:
            return
        events = []
        # This job's ranks only: an earlier, larger job may have left more rank files.
        parts = [p for p in (f"{self.path}.rank{r}" for r in range(self.world_size)) if os.path.exists(p)]
        for part in parts:
            with open(part) as fh:
                events.extend(json.loads(line) for line in fh if line.strip())
        for r in sorted({e["pid"] for e in events}):
            events.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}})
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)
        os.replace(tmp, self.path)
        for part in parts:
            os.remove(part)
