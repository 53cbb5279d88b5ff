"""The names of the allreduce algorithms and wire codecs, and where each algorithm lives.

Pure (no torch), so settings, the CLI's choices and the simulator read the names without
loading an engine. Adding an algorithm: write a module with
`allreduce_(comm, flat, op, seq, fill=None)` (reduce the contiguous 1-D tensor `flat` in place
over the communicator `comm`; `fill(lo, hi)`, if given, writes flat[lo:hi] and must be called
for every element before the algorithm reads it: once for the whole buffer, or chunk by chunk
as a pipelined algorithm reaches each chunk; see pyddl.comm.native) and add one line to
ALGORITHMS.
"""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["ALGORITHMS", "ALGORITHM_CHOICES", "AUTO", "CODECS", "load_algorithm"]

ALGORITHMS = {
    "native": "pyddl.comm.native",  # the backend's own allreduce over all ranks (a flat ring)
    "multiring": "pyddl.comm.multiring",  # DDL's topology-aware, pipelined rings
}
AUTO = "auto"  # times every algorithm at start-up and picks one per message size
ALGORITHM_CHOICES = (*ALGORITHMS, AUTO)
CODECS = ("none", "fp16", "bf16")


def load_algorithm(name: str) -> Callable:
    """The `allreduce_(comm, flat, op, seq, fill=None)` function of a registered algorithm."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown allreduce algorithm {name!r}; choose one of {', '.join(ALGORITHM_CHOICES)}")
    return importlib.import_module(ALGORITHMS[name]).allreduce_
