"""The one place pyddl.jax reaches the core: every collective and rank query goes through here.

The adapter only ever hands the core torch tensors it owns (packed per dtype), so the core's
engine, cross-rank check, timeouts and algorithms apply unchanged. When the core grows a
Communicator object, `core()` returns it instead of the module.
"""

from __future__ import annotations

import pyddl


def core():
    """The communicator every pyddl.jax collective runs on (today: the world, `pyddl`)."""
    return pyddl
