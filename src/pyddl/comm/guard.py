"""Guards around every collective: a cross-rank fingerprint check and named timeouts.

Each rank publishes a heartbeat to the job's store from a background thread: the number and
name of the collective it is in, and a beat counter. The collective path itself never touches
the store. When a collective fails or times out, the heartbeats tell which ranks never
arrived (their number is behind) and which are silent (exited or frozen).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pyddl.errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError

__all__ = ["Monitor", "OpInfo", "check_fingerprints", "fingerprint"]


@dataclass(frozen=True)
class OpInfo:
    """What a collective call is, for matching across ranks and for error messages."""

    name: str  # e.g. "allreduce"
    detail: str  # e.g. "float32[1024] op=sum algorithm=multiring"

    def __str__(self) -> str:
        return f"{self.name}({self.detail})"


def fingerprint(info: OpInfo) -> int:
    """A 62-bit digest of the call; equal on every rank for matching calls."""
    digest = hashlib.blake2b(str(info).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def check_fingerprints(info: OpInfo, seq: int, group, group_ranks: list[int], device) -> None:
    """Raise CollectiveMismatchError on every rank if the ranks' calls differ.

    One 2-element MAX allreduce compares max(fp) with min(fp); only on a mismatch are the
    descriptions gathered to name who called what.
    """
    fp = fingerprint(info)
    t = torch.tensor([fp, -fp], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) == -int(t[1]):
        return
    described: list = [None] * len(group_ranks)
    dist.all_gather_object(described, str(info), group=group)
    calls: dict[str, list[int]] = {}
    for rank, text in zip(group_ranks, described):
        calls.setdefault(text, []).append(rank)
    listing = "; ".join(f"ranks {_ranks(rs)}: {text}" for text, rs in calls.items())
    raise CollectiveMismatchError(
        f"pyddl: collective #{seq} differs across ranks — {listing}. Every rank must call the "
        "same collectives in the same order with the same shapes and dtypes."
    )


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks))


class Monitor:
    """Heartbeat publisher and post-mortem reader for one process."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        self._store = dist.PrefixStore("pyddl/hb", store) if store is not None else None
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.seq = 0
        self.current = "init"
        self._beat = 0
        self.interval_s = min(1.0, max(0.1, timeout_s / 10))
        self._stop = threading.Event()
        self._thread = None
        if self._store is not None and world_size > 1:
            self._publish()
            self._thread = threading.Thread(target=self._run, name="pyddl-heartbeat", daemon=True)
            self._thread.start()

    def enter(self, seq: int, info: OpInfo) -> None:
        self.seq, self.current = seq, info.name

    def _publish(self) -> None:
        self._beat += 1
        self._store.set(str(self.rank), f"{self.seq}|{self.current}|{self._beat}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
            except Exception:
                return  # the store is gone (rank 0 exited); post-mortems will say so

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)

    def _read(self, ranks: list[int]) -> dict[int, tuple[int, str, int] | None]:
        out: dict[int, tuple[int, str, int] | None] = {}
        for r in ranks:
            key = str(r)
            if not self._store.check([key]):
                out[r] = None
                continue
            seq, name, beat = self._store.get(key).decode().split("|")
            out[r] = (int(seq), name, int(beat))
        return out

    def diagnose(self, seq: int, info: OpInfo, group_ranks: list[int], cause: BaseException) -> CollectiveError:
        """Turn a failed wait into an error naming the ranks that did not arrive."""
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        head = (
            f"pyddl: {info} (collective #{seq}) on ranks {_ranks(group_ranks)} "
            + (f"timed out after {self.timeout_s:g} s" if timed_out else f"failed: {text}")
        )
        others = [r for r in group_ranks if r != self.rank]
        if self._store is None or not others:
            return (CollectiveTimeoutError if timed_out else CollectiveError)(head)
        try:
            self._store.set_timeout(timedelta(seconds=5))
            first = self._read(others)
            time.sleep(2.5 * self.interval_s)
            second = self._read(others)
        except Exception:
            return CollectiveError(
                f"{head}. The job's store (hosted by rank 0 / the launcher) is unreachable: "
                "rank 0 or the launcher has probably exited."
            )
        behind, silent = [], []
        for r in others:
            a, b = first[r], second[r]
            if b is None or b[0] < seq:
                behind.append((r, b))
            if a is None or b is None or a[2] == b[2]:
                silent.append(r)
        parts = [head]
        if behind:
            notes = []
            for r, hb in behind:
                where = "never started" if hb is None else f"is at collective #{hb[0]} ({hb[1]})"
                notes.append(f"rank {r} {where}")
            parts.append("ranks that did not arrive: " + ", ".join(notes))
        if silent:
            parts.append(f"no heartbeat from ranks {_ranks(silent)} (exited or frozen)")
        if not behind and not silent:
            parts.append("every rank arrived; a connection failed (a peer exited or a link dropped)")
        missing = tuple(r for r, _ in behind) or tuple(silent)
        cls = CollectiveTimeoutError if timed_out else CollectiveError
        return cls(". ".join(parts) + ".", missing_ranks=missing)
