"""The `auto` allreduce: time each algorithm on this job's real topology at start-up.

Rank 0's timings decide, and its choice is broadcast so every rank picks the same algorithm
for a given message size (ranks choosing differently would mismatch). A message uses the
choice made for the nearest timed size on a log scale.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from pyddl.comm.registry import ALGORITHMS

__all__ = ["AutoTable", "tune", "CANDIDATES", "TUNE_SIZES"]

CANDIDATES = tuple(ALGORITHMS)
# Small to large messages, one at the gradient bucket size (2 MiB): a size between two timed
# ones takes the nearer one's choice, and with three sizes (16K, 512K, 8M) 1-2 MiB buckets
# followed a 512 KiB timing where both algorithms run close and noise picked, on the
# emulated 2x2 bed the slower one. Start-up: about 3 s on 1 Gbit/s links.
TUNE_SIZES = (16 * 1024, 256 * 1024, 2 * 1024 * 1024, 16 * 1024 * 1024)


@dataclass(frozen=True)
class AutoTable:
    """The chosen algorithm per timed message size (bytes), and rank 0's median times."""

    sizes: tuple[int, ...]
    choices: tuple[str, ...]
    times_s: dict

    def pick(self, nbytes: int) -> str:
        """The algorithm for a message of `nbytes`: the choice of the nearest timed size."""
        key = math.log2(max(nbytes, 1))
        nearest = min(range(len(self.sizes)), key=lambda i: abs(math.log2(self.sizes[i]) - key))
        return self.choices[nearest]


def tune(comm, sizes: tuple[int, ...] = TUNE_SIZES, reps: int = 5) -> AutoTable:
    """Time every candidate at every size on all of `comm`'s ranks; return rank 0's choices."""
    times: dict = {}
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // 4))
        for alg in CANDIDATES:
            comm.allreduce_(x, algorithm=alg)  # warm-up: connections, buffers
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                comm.allreduce_(x, algorithm=alg)
                samples.append(time.perf_counter() - t0)
            times[(alg, nbytes)] = statistics.median(samples)
    best = torch.tensor(
        [min(range(len(CANDIDATES)), key=lambda i: times[(CANDIDATES[i], n)]) for n in sizes]
    )
    comm.broadcast_(best, root=0)
    return AutoTable(tuple(sizes), tuple(CANDIDATES[int(i)] for i in best), times)
