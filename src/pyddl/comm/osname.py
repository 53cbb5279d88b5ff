"""Kernel-level names for pyddl's threads, so that `top -H`, `perf` and `renice` can find them.

Python 3.11 keeps a thread's name to itself: the kernel shows every Python thread under the
process's name. Each of pyddl's long-lived threads calls `name_this_thread()` first thing.
"""

from __future__ import annotations

import ctypes
import sys
import threading

__all__ = ["name_this_thread"]

_PR_SET_NAME = 15  # <linux/prctl.h>
_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last a NUL


def name_this_thread() -> None:
    """Give the calling thread its Python name in the kernel too (its first 15 bytes; Linux
    only). A name is a debugging aid: where the call is missing or fails, nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    name = threading.current_thread().name.encode("utf-8", "replace")[:_NAME_BYTES]
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):  # no libc symbols in this process: keep the process's name
        pass
