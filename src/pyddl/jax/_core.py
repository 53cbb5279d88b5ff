"""The one place pyddl.jax reaches the core: every collective runs on the Communicator that
`core()` returns.

The adapter only ever hands the core torch tensors it owns (packed per dtype), so the core's
engine, cross-rank check, timeouts and algorithms apply unchanged.
"""

from __future__ import annotations

import pyddl
from pyddl.comm.communicator import Communicator


def core() -> Communicator:
    """The communicator every pyddl.jax collective runs on: the job's world."""
    return pyddl.world()
