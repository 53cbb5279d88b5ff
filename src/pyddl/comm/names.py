"""Matching named collectives by name, as Horovod does, so ranks may submit them in any order.

Every rank speculates that the others run its next job too: the cross-rank check's fingerprint
covers the name, so a steady loop whose ranks submit in one order pays nothing more. When the
check finds the ranks at different names, each offers the names at the front of its queue, up
to its first unnamed job (matched by order, so never overtaken), and every rank runs next the
first name, in the lowest rank's order, that every rank offers. Horovod's coordinator instead
collects every rank's ready names each cycle (horovod/common/controller.cc). Pure: the
communicator hands `negotiate` its gather and its engine, so this imports without torch.
"""

from __future__ import annotations

import time
from typing import Callable

from pyddl.errors import CollectiveMismatchError, CollectiveTimeoutError

__all__ = ["agree", "stuck", "negotiate"]

# An offer: (the names a rank has ready, in its order; whether an unnamed job follows them).
# A joined rank offers None: it serves whatever the others run.
Offer = tuple[list[str], bool] | None


def agree(offers: list[Offer]) -> str | None:
    """The name every rank has ready, first in the lowest rank's order; None if there is none.

    >>> agree([(["a", "b"], False), (["b", "a"], True)])
    'a'
    """
    active = [o for o in offers if o is not None]
    if not active:
        return None
    others = [set(names) for names, _ in active[1:]]
    return next((n for n in active[0][0] if all(n in s for s in others)), None)


def stuck(offers: list[Offer]) -> bool:
    """Whether no name can ever be ready on every rank: a closed offer (an unnamed job follows
    it) can take no more names, so the closed offers must share one.

    >>> stuck([(["a"], False), ([], True)])  # allreduce(name="a") on rank 0, unnamed on rank 1
    True
    """
    closed = [set(names) for names, done in (o for o in offers if o is not None) if done]
    return bool(closed) and not set.intersection(*closed)


def negotiate(gather: Callable[[object], list], engine, ranks, timeout_s: float, seq: int, listing: str,
              joined: bool = False) -> str:
    """Exchange offers with every rank (on the engine thread of their communicator, whose
    `gather` returns every rank's object) until one name is ready everywhere, waiting for more
    submissions between rounds; return that name.

    `ranks` are the job ranks, for the errors; `listing` says what each rank was about to run.

    Raises:
        CollectiveMismatchError: no name can ever be ready everywhere (`stuck`).
        CollectiveTimeoutError: none was within the timeout; it says which rank lacks which name.
    """
    deadline = time.monotonic() + timeout_s
    pause_s = 0.001
    while True:
        seen = engine.submitted
        mine = None if joined else engine.ready_names()
        everyone = gather((mine, time.monotonic() > deadline))
        offers = [offer for offer, _ in everyone]
        key = agree(offers)
        if key is not None:
            return key
        if stuck(offers):
            raise CollectiveMismatchError(
                f"pyddl: collective #{seq} differs across ranks — {listing}. Named calls may come in "
                "any order, but not past an unnamed call (matched by order), and these never can: "
                f"{_ready(ranks, offers)}. Every rank must submit the same named calls between "
                "two unnamed ones."
            )
        if any(late for _, late in everyone):
            lacking = _lacking(ranks, offers)
            raise CollectiveTimeoutError(
                f"pyddl: collective #{seq}: named calls were not submitted on every rank within "
                f"{timeout_s:g} s — "
                + "; ".join(f"rank {r} lacks {', '.join(map(repr, names))}" for r, names in lacking)
                + f" ({_ready(ranks, offers)})",
                missing_ranks=tuple(r for r, _ in lacking),
            )
        engine.wait_for_submission(seen, pause_s)
        pause_s = min(2 * pause_s, 0.05)


def _ready(ranks, offers: list[Offer]) -> str:
    def one(offer: Offer) -> str:
        if offer is None:
            return "has joined"
        names, closed = offer
        ready = ", ".join(map(repr, names)) if names else "no named call"
        return f"has {ready} ready" + (", then an unnamed call" if closed else "")

    return "; ".join(f"rank {r} {one(o)}" for r, o in zip(ranks, offers))


def _lacking(ranks, offers: list[Offer]) -> list[tuple[int, list[str]]]:
    """Each rank that lacks a name another rank has ready, with those names (in order)."""
    every = list(dict.fromkeys(n for o in offers if o is not None for n in o[0]))
    out = []
    for r, offer in zip(ranks, offers):
        if offer is not None and (lacks := [n for n in every if n not in offer[0]]):
            out.append((r, lacks))
    return out
