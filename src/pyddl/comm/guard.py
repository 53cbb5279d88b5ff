"""Guards around every collective: a cross-rank fingerprint check and named timeouts.

Each rank publishes a heartbeat to the job's store from a background thread: the number and
name of the collective it is in, and a beat counter. The collective path itself never touches
the store. When a collective fails or times out, the heartbeats tell which ranks never
arrived (their number is behind) and which are silent (exited or frozen).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from pyddl.comm.osname import name_this_thread
from pyddl.errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError

__all__ = ["AHEAD", "AheadCheck", "Monitor", "NamesDiffer", "OpInfo", "Round", "exchange"]


@dataclass(frozen=True)
class OpInfo:
    """What a collective call is, for matching across ranks and for error messages."""

    name: str  # e.g. "allreduce"
    detail: str  # e.g. "float32[1024] op=sum algorithm=multiring"
    # How a rank that has called join() takes part: the flat buffers (numel, dtype name) this
    # collective reduces, in order, with (op, algorithm, codec). None: not joinable.
    join_spec: tuple | None = None
    # Horovod's name= with its kind ("allreduce.grad.w"): ranks match the call by it, not by
    # its place in their order (comm/names.py). None: matched by order.
    key: str | None = None

    def __str__(self) -> str:
        named = "" if self.key is None else f" name={self.key!r}"
        return f"{self.name}({self.detail}{named})"

    @functools.cached_property
    def fingerprint(self) -> int:
        """A 62-bit digest of the call; equal on every rank for matching calls. Computed once:
        the engine reads it when the call is queued, the check when it runs."""
        digest = hashlib.blake2b(str(self).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2


@dataclass(frozen=True)
class Round:
    """What one exchange learned: whether some or all ranks have joined, and for a joined
    rank the collective it must serve (its join_spec and sequence number)."""

    some_joined: bool
    all_joined: bool
    last_joined: int  # with all_joined: the rank that joined last (highest collective number)
    max_seq: int  # with all_joined: the highest collective number of any rank
    serve: tuple | None = None  # (join_spec, seq) of the collective the others are running
    # The calls queued right behind this one that every rank has in the same order: they are
    # checked already and skip their own exchange.
    ahead_verified: int = 0


# torch 2.14 renamed all_gather_into_tensor (and warns on the old name); 2.4 has only that.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_rows(everyone: torch.Tensor, mine: torch.Tensor, group, async_op: bool = False):
    """Every rank's row `mine` into `everyone`, in rank order (an allgather).

    On Gloo, from 3 ranks, it is an all-to-all of the row copied once per rank: one hop to every
    peer at once, where Gloo's allgather passes the rows around a ring in P-1 steps, each
    waiting for the next rank to be scheduled (4 ranks on the emulated 2x2 bed, median 1.3
    against 2.3 ms; 1.6 against 3.0 with the cores busy). With 2 ranks both are one hop. NCCL
    keeps its allgather.
    """
    if everyone.numel() > 2 * mine.numel() and dist.get_backend(group) == "gloo":
        copies = mine.repeat(everyone.numel() // mine.numel())
        return dist.all_to_all_single(everyone, copies, group=group, async_op=async_op)
    return _all_gather_flat(everyone, mine, group=group, async_op=async_op)


class NamesDiffer(Exception):
    """The ranks are at different named calls (or named against unnamed): not an error yet,
    since named calls may come in any order; the ranks negotiate (comm/names.py)."""

    def __init__(self, listing: str):
        super().__init__(listing)
        self.listing = listing


_JOINED_FP = -1
_NO_FP = -(1 << 62)
# How many queued calls one exchange can vouch for besides its own (see `exchange`).
AHEAD = 7
_WIDTH = 5 + 2 * AHEAD


def exchange(info: OpInfo | None, seq: int, group, group_ranks: list[int], device, rank: int,
             ahead: Sequence[int] = ()) -> Round:
    """Compare every rank's call before a collective; `info=None` means "I have joined".

    Every rank contributes 5 + 2 x AHEAD numbers and takes their maximum over the ranks:
    [fp, -fp] compares the calls of the ranks that have not joined (joined ranks send values
    below any fingerprint), the third says whether any rank joined, the fourth packs
    (seq, rank) so that the all-joined round names the last joiner. The rest compare the
    fingerprints `ahead` of the unnamed calls queued right behind this one (Engine.ahead):
    the fifth is minus their count, then [fp, -fp] for each. Where every rank has the same
    first k of them, `Round.ahead_verified` is k on every rank and those calls run without an
    exchange of their own: in a training step, where the gradient buckets queue up while the
    network is busy, one exchange covers several of them. The maximum is taken locally after
    an allgather (`_gather_rows`): Gloo's allgather of a few bytes costs about a third of its
    allreduce (0.5 vs 1.7 ms on loopback, most of it CPU). A difference gathers the
    descriptions to name who called what, and raises CollectiveMismatchError on every rank; or NamesDiffer on every
    rank where the ranks are at different names (the fingerprint covers the name), so that
    they negotiate instead.
    """
    if info is None:
        mine = _row([_JOINED_FP, _NO_FP, 1, (seq << 20) | rank], (), device)
    else:
        mine = _row([info.fingerprint, -info.fingerprint, 0, 0], ahead, device)
    everyone = torch.empty(_WIDTH * len(group_ranks), dtype=torch.int64, device=device)
    _gather_rows(everyone, mine, group)
    high, neg_low, some_joined, packed, neg_count, *rest = everyone.view(-1, _WIDTH).max(dim=0).values.tolist()
    if high == _JOINED_FP:
        return Round(True, True, packed & ((1 << 20) - 1), packed >> 20)
    if high == -neg_low and not some_joined:
        return Round(False, False, -1, -1, ahead_verified=_alike(neg_count, rest))
    described: list = [None] * len(group_ranks)
    mine = None if info is None else (str(info), info.join_spec, seq, info.key)
    dist.all_gather_object(described, mine, group=group)
    if high != -neg_low:
        calls: dict[str, list[int]] = {}
        for r, entry in zip(group_ranks, described):
            calls.setdefault("join()" if entry is None else entry[0], []).append(r)
        listing = "; ".join(f"ranks {_ranks(rs)}: {text}" for text, rs in calls.items())
        if len({entry[3] for entry in described if entry is not None}) > 1:
            raise NamesDiffer(listing)  # different names (or a name and none): negotiate
        raise CollectiveMismatchError(
            f"pyddl: collective #{seq} differs across ranks — {listing}. Every rank must call the "
            "same collectives in the same order with the same shapes and dtypes."
        )
    active = next(entry for entry in described if entry is not None)
    if active[1] is None:
        joined = [r for r, entry in zip(group_ranks, described) if entry is None]
        # Found before any data moved: the ranks that called it raise, the joined ones go on
        # serving (Horovod's meaning), and the job stays usable.
        raise CollectiveMismatchError(
            f"pyddl: ranks {_ranks(joined)} have called join(), and {active[0]} cannot run while "
            "ranks are joined (only allreduce-type collectives can: joined ranks contribute "
            "zeros). Call it before join(), or join later."
        )
    return Round(True, False, -1, -1, serve=(active[1], active[2]))


def _row(head: list[int], ahead: Sequence[int], device) -> torch.Tensor:
    """One rank's numbers for an exchange: the four of its own call (`head`), minus the count
    of the calls queued behind it, then [fp, -fp] for each of them (up to AHEAD), zeros after."""
    ahead = list(ahead)[:AHEAD]
    values = head + [-len(ahead)] + [v for f in ahead for v in (f, -f)]
    return torch.tensor(values + [0] * (_WIDTH - len(values)), dtype=torch.int64, device=device)


def _alike(neg_count: int, pairs: list[int]) -> int:
    """How many of the queued fingerprints every rank has alike, from the maxima of (minus
    their count, then [fp, -fp] for each)."""
    alike = 0
    while alike < -neg_count and pairs[2 * alike] == -pairs[2 * alike + 1]:
        alike += 1
    return alike


class AheadCheck:
    """The check of the calls queued behind a running one, in flight while that one moves its
    data: an allgather of `exchange`'s ahead part (the first five numbers are unused), posted
    asynchronously on the same group. Every rank posts one at the same collective (see
    Communicator.run), so the allgathers pair up. `alike()` waits for it and says how many of
    the queued calls every rank has alike; like the ahead part of `exchange`, it finds
    agreement and never raises a mismatch: a call it cannot vouch for gets its own exchange,
    which names the difference."""

    def __init__(self, ahead: Sequence[int], group, n_ranks: int, device, asynchronous: bool = True):
        self._everyone = torch.empty(_WIDTH * n_ranks, dtype=torch.int64, device=device)
        self._work = _gather_rows(self._everyone, _row([0, 0, 0, 0], ahead, device), group,
                                  async_op=asynchronous)

    def alike(self) -> int:
        if self._work is not None:
            self._work.wait()
        neg_count, *pairs = self._everyone.view(-1, _WIDTH).max(dim=0).values[4:].tolist()
        return _alike(neg_count, pairs)


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks))


class Monitor:
    """Heartbeat publisher and post-mortem reader for one process."""

    def __init__(self, store, rank: int, ranks, timeout_s: float, stall_warn_s: float, prefix: str = "world"):
        # One key space per communicator: its collective numbers are its own.
        self._store = dist.PrefixStore(f"pyddl/hb/{prefix}", store) if store is not None else None
        self.rank, self.ranks, self.timeout_s = rank, tuple(ranks), timeout_s
        # A collective waiting this long names the ranks behind; a warning, the timeout is the error.
        self.stall_warn_s = stall_warn_s
        self.seq = 0
        self.current = "init"
        self._entered_at: float | None = None
        self._warned_seq = -1
        self._beat = 0
        self.interval_s = min(1.0, max(0.1, timeout_s / 10))
        self._stop = threading.Event()
        self._thread = None
        if self._store is not None and len(self.ranks) > 1:
            self._publish()
            self._thread = threading.Thread(target=self._run, name="pyddl-heartbeat", daemon=True)
            self._thread.start()

    def enter(self, seq: int, info: OpInfo) -> None:
        self.seq, self.current = seq, info.name
        self._entered_at = time.monotonic()

    def leave(self) -> None:
        self._entered_at = None

    def _publish(self) -> None:
        self._beat += 1
        self._store.set(str(self.rank), f"{self.seq}|{self.current}|{self._beat}")

    def _run(self) -> None:
        name_this_thread()
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                self._check_stall()
            except Exception:
                return  # the store is gone (rank 0 exited); post-mortems will say so

    def _check_stall(self) -> None:
        entered, seq = self._entered_at, self.seq
        if entered is None or seq == self._warned_seq:
            return
        waited = time.monotonic() - entered
        if waited < self.stall_warn_s:
            return
        others = [r for r in self.ranks if r != self.rank]
        behind = [(r, hb) for r, hb in self._read(others).items() if hb is None or hb[0] < seq]
        if not behind:
            return
        self._warned_seq = seq
        notes = ", ".join(f"rank {r} " + self._where(hb, seq) for r, hb in behind)
        print(
            f"pyddl: warning: rank {self.rank} has waited {waited:.0f} s in collective #{seq} "
            f"({self.current}) for slower ranks: {notes}. Not an error yet: the timeout is "
            f"{self.timeout_s:g} s.",
            file=sys.stderr,
            flush=True,
        )

    def _silent_s(self, hb: tuple[int, str, int]) -> float:
        # Every rank's heartbeat thread beats once per interval from init on, so a rank whose
        # beat count lags this one's by k has been silent for about k intervals.
        return (self._beat - hb[2]) * self.interval_s

    def _where(self, hb: tuple[int, str, int] | None, seq: int) -> str:
        if hb is None:
            return "has not started"
        silent = self._silent_s(hb)
        if silent >= max(3 * self.interval_s, 2.0):
            # Its number is where it was when it went silent, not how far behind it is.
            return f"sent no heartbeat for about {silent:.0f} s (frozen or exited; last at #{hb[0]} ({hb[1]}))"
        return f"is {seq - hb[0]} collective(s) behind, at #{hb[0]} ({hb[1]})"

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
                if hb is None:
                    where = "never started"
                elif r in silent:
                    where = f"was last heard at collective #{hb[0]} ({hb[1]})"
                else:
                    where = f"is at collective #{hb[0]} ({hb[1]})"
                notes.append(f"rank {r} {where}")
            parts.append("ranks that did not arrive: " + ", ".join(notes))
        if silent:
            ages = [self._silent_s(second[r]) for r in silent if second[r] is not None]
            age = f" for about {min(ages):.0f} s" if ages else ""
            parts.append(f"no heartbeat from ranks {_ranks(silent)}{age} (exited or frozen)")
        if not behind and not silent:
            parts.append("every rank arrived and is alive, so the error above is the cause: raised on "
                         "this rank, or by its connection to a peer")
        missing = tuple(r for r, _ in behind) or tuple(silent)
        cls = CollectiveTimeoutError if timed_out else CollectiveError
        return cls(". ".join(parts) + ".", missing_ranks=missing)
