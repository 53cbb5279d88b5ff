"""Tensor fusion: pack many small tensors into one flat bucket, and unpack after; and queued
allreduces that share one pipelined pass (`Part`).

Which tensors share a bucket is pure arithmetic (pyddl.comm.layout.plan_buckets); these do
the copies.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["Packing", "Part", "pack", "unpack"]


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Copy `tensors` (one dtype) into one flat buffer, in order.

    `out` may have another dtype (a wire dtype); `scale` multiplies in the tensors' own dtype
    during the same pass, before any narrowing cast.
    """
    total = sum(t.numel() for t in tensors)
    if out is None:
        out = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        n = t.numel()
        if scale == 1.0:
            out[offset : offset + n].copy_(t.reshape(-1))
        else:
            torch.mul(t.reshape(-1), scale, out=out[offset : offset + n])
        offset += n
    return out


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy slices of `flat` back into `tensors`, in order (the inverse of `pack`)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


@dataclass(frozen=True)
class Part:
    """An allreduce job that may share one multiring pass with the jobs queued behind it.

    A bucket of one 2 MiB chunk runs the multiring's stages one after another, so the links
    between servers wait while the stages inside a server run. When the cross-rank check has
    found the same jobs queued behind a running one on every rank, the running job takes those
    whose `key` equals its own and pipelines all their chunks through the stages in one pass
    (Communicator.run). What shares a pass is then decided alike on every rank, as Horovod's
    coordinator decides its fusion buffer.
    """

    dtype: str  # the wire dtype; with op and algorithm, covered by the call's fingerprint
    op: str
    algorithm: str
    buffer: Callable[[], Any]  # the flat 1-D contiguous buffer to reduce in place (engine thread)
    fill: Callable[[Any], None] | None  # fill(buffer) writes it just before its first chunk moves
    finish: Callable[[Any], Any]  # finish(buffer) after its last chunk: unpack; the job's result

    @property
    def key(self) -> tuple:
        """Parts share a pass only with parts of the same key."""
        return self.dtype, self.op, self.algorithm


class Packing:
    """1-D `sources` (one dtype) laid out in the flat buffer `flat` at `spans` (offset, numel),
    in increasing offset order; whatever lies between or after the spans is zero.

    `fill(lo, hi)` writes one range of `flat`. A pipelined allreduce calls it chunk by chunk
    just before the chunk's first transfer, so the copies (and the page faults of a freshly
    allocated buffer) overlap the transfers of the chunks ahead of it.
    """

    def __init__(self, flat: torch.Tensor, sources: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]):
        self.flat, self.sources, self.spans = flat, list(sources), list(spans)
        self._starts = [offset for offset, _ in self.spans]

    @classmethod
    def back_to_back(cls, sources: Sequence[torch.Tensor], device) -> "Packing":
        """`sources` (1-D, one dtype) one after another in a new, not yet written buffer."""
        spans, offset = [], 0
        for source in sources:
            spans.append((offset, source.numel()))
            offset += source.numel()
        return cls(torch.empty(offset, dtype=sources[0].dtype, device=device), sources, spans)

    def fill(self, lo: int, hi: int) -> None:
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        at = lo
        while at < hi:
            offset, n = self.spans[i] if i < len(self.spans) else (hi, 0)
            if at < offset:  # a gap before span i
                end = min(offset, hi)
                self.flat[at:end].zero_()
            elif at < offset + n:
                end = min(offset + n, hi)
                self.flat[at:end].copy_(self.sources[i][at - offset : end - offset])
            else:
                i += 1
                continue
            at = end
