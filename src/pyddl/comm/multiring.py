"""The multiring allreduce (DDL, Cho et al. 2017): one ring per topology dim, pipelined.

Reduce-scatter along each dim innermost-first (the fast intra-server links first, so the slow
outer links carry only a 1/(d1...d(k-1)) shard), then allgather back in reverse order. A large
buffer is cut into chunks that flow through the 2k stages like a pipeline: while chunk i
crosses the servers, chunk i+1 is reduced inside them ("keep every link busy"). One thread
drives all the stages (`_interleaved`), posting each ring step's messages and waiting for
the oldest; tagged messages tell the stages' messages apart. NCCL matches p2p messages by
order rather than tag, so on NCCL the chunks run one after another. `allreduce_` is the
entry the algorithm registry calls.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from pyddl.comm.ring import drive, equal_parts, ring_allgather_steps, ring_reduce_scatter_steps

__all__ = ["Level", "allreduce_", "allreduce_many_", "multiring_allreduce_", "plan_chunks"]


@dataclass(frozen=True)
class Level:
    """One dim of the topology as seen by this rank: its ring and its place in it."""

    size: int
    ranks: tuple[int, ...]  # global ranks of this rank's slice, by coordinate
    coord: int  # this rank's index in `ranks`
    group: object  # the slice's process group
    # A 2-rank ring sends to and receives from the same peer. Gloo serialises the two
    # directions on one connection (measured: 32 MiB each way took 530-650 ms where the link
    # allows 268 ms), so 2-rank slices get a second group: one connection per direction.
    reverse_group: object = None

    @property
    def send_group(self):
        return self.group if self.reverse_group is None or self.coord == 0 else self.reverse_group

    @property
    def recv_group(self):
        return self.group if self.reverse_group is None or self.coord == 1 else self.reverse_group


def plan_chunks(numel: int, itemsize: int, chunk_bytes: int, ranks_total: int) -> list[tuple[int, int]]:
    """Cut [0, numel) into pipeline chunks of about `chunk_bytes` (start, length) each.

    Chunks are multiples of the number of ranks where possible so that no padding is needed
    except in the last one.
    """
    if numel == 0:
        return []
    per_chunk = max(ranks_total, (chunk_bytes // itemsize) // ranks_total * ranks_total)
    return [(s, min(per_chunk, numel - s)) for s in range(0, numel, per_chunk)]


@dataclass(frozen=True)
class _Stage:
    """Reduce-scatter ("rs") or allgather ("ag") along level `depth`; `index` orders stages."""

    index: int
    depth: int
    kind: str


def _stages(n_levels: int) -> list[_Stage]:
    rs = [_Stage(j, j, "rs") for j in range(n_levels)]
    ag = [_Stage(n_levels + i, j, "ag") for i, j in enumerate(reversed(range(n_levels)))]
    return rs + ag


def _segment(levels: list[Level], depth: int, length: int) -> tuple[int, int]:
    # After reduce-scattering levels 0..depth-1 this rank owns the piece at its coordinates;
    # the stages of level `depth` (its reduce-scatter and its allgather) work on that piece.
    start, seg = 0, length
    for lv in levels[:depth]:
        start, seg = equal_parts(start, seg, lv.size)[lv.coord]
    return start, seg


def _stage_steps(stage: _Stage, levels: list[Level], buf: torch.Tensor, op: str, tag: int) -> Iterator[list]:
    lv = levels[stage.depth]
    parts = equal_parts(*_segment(levels, stage.depth, buf.numel()), lv.size)
    if stage.kind == "rs":
        return ring_reduce_scatter_steps(buf, parts, lv.ranks, lv.coord, lv.send_group, op, tag, lv.recv_group)
    return ring_allgather_steps(buf, parts, lv.ranks, lv.coord, lv.send_group, tag, lv.recv_group)


def allreduce_(comm, flat: torch.Tensor, op: str, seq: int, fill: Callable[[int, int], None] | None = None) -> None:
    """The registered `multiring` algorithm: `flat` over the communicator's topology levels."""
    multiring_allreduce_(flat, op, comm.levels, comm.settings.chunk_bytes, seq,
                         pipelined=comm.backend != "nccl", fill=fill)


def multiring_allreduce_(
    flat: torch.Tensor,
    op: str,
    levels: list[Level],
    chunk_bytes: int,
    call_id: int,
    pipelined: bool = True,
    fill: Callable[[int, int], None] | None = None,
) -> None:
    """Allreduce the 1-D contiguous tensor `flat` in place over `levels`, innermost first.

    `op` is sum/average/min/max/product; average divides the sum by the number of ranks
    (floor division for integers). `call_id` must be the same on every rank for this call.
    `pipelined`: the chunks flow through the stages together (Gloo); otherwise they run one
    after another (NCCL matches p2p messages by order, not tag). `fill(lo, hi)`, if given,
    writes flat[lo:hi] chunk by chunk just before the chunk's first stage.
    """
    levels = [lv for lv in levels if lv.size > 1]
    if not levels or flat.numel() == 0:
        if fill is not None:
            fill(0, flat.numel())
        return
    total = math.prod(lv.size for lv in levels)
    chunks = plan_chunks(flat.numel(), flat.element_size(), chunk_bytes, total)
    fill_chunk = None if fill is None else (lambda k: fill(chunks[k][0], chunks[k][0] + chunks[k][1]))
    run_stages_([flat[start : start + length] for start, length in chunks], op, levels, call_id, "allreduce",
                pipelined, fill=fill_chunk)


def allreduce_many_(comm, flats: list[torch.Tensor], op: str, seq: int, fill: Callable[[int], None],
                    drain: Callable[[int], None]) -> int:
    """Allreduce each of `flats` (1-D, contiguous) in place in one pass: the chunks of all of
    them flow through the stages back to back, as one buffer's would. `fill(i)` writes flats[i]
    just before its first chunk moves, `drain(i)` reads it after its last (on the pipeline's
    last stage); neither is called for an empty one. Gloo only: it pipelines the chunks, which
    NCCL's p2p matching by order does not allow. Returns the number of chunks the pass ran.

    Consecutive flats that lie back to back in one storage (a DistributedOptimizer's buckets,
    `pyddl.torch.reducer`) are cut into chunks as one buffer, so a chunk may carry the end of
    one and the start of the next: 1 MiB fp16 buckets then move in 2 MiB chunks, half the
    messages. Which flats join depends only on how their owner laid them out, which every
    rank has alike (the reducer's layout is checked across ranks), so every rank cuts the same
    chunks.
    """
    levels = [lv for lv in comm.levels if lv.size > 1]
    total = math.prod(lv.size for lv in levels)
    chunks: list[torch.Tensor] = []
    starting: dict[int, list[int]] = {}  # chunk -> the flats whose first element it carries
    ending: dict[int, list[int]] = {}  # chunk -> the flats whose last element it carries
    for buf, members in _back_to_back(flats):
        base = len(chunks)
        plan = plan_chunks(buf.numel(), buf.element_size(), comm.settings.chunk_bytes, total)
        chunks += [buf[start : start + length] for start, length in plan]
        per_chunk = plan[0][1]  # every chunk but the last is this long
        for i, lo, hi in members:
            starting.setdefault(base + lo // per_chunk, []).append(i)
            ending.setdefault(base + (hi - 1) // per_chunk, []).append(i)

    def fill_chunk(c: int) -> None:
        for i in starting.get(c, ()):
            fill(i)

    def drain_chunk(c: int) -> None:
        for i in ending.get(c, ()):
            drain(i)

    run_stages_(chunks, op, levels, seq, "allreduce", True, fill=fill_chunk, drain=drain_chunk)
    return len(chunks)


def _back_to_back(flats: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[tuple[int, int, int]]]]:
    """Group the non-empty `flats` into buffers to chunk: a run of consecutive flats that lie
    back to back in one storage becomes one view over all of them. Each buffer comes with its
    members, (index into flats, start, stop) within the buffer."""
    runs: list[tuple[torch.Tensor, list[tuple[int, int, int]]]] = []
    for i, flat in enumerate(flats):
        if flat.numel() == 0:
            continue
        if runs and _continues(runs[-1][0], flat):
            buf, members = runs[-1]
            n, m = buf.numel(), flat.numel()
            runs[-1] = (buf.as_strided((n + m,), (1,), buf.storage_offset()), members + [(i, n, n + m)])
        else:
            runs.append((flat, [(i, 0, flat.numel())]))
    return runs


def _continues(buf: torch.Tensor, flat: torch.Tensor) -> bool:
    # The same allocation, and `flat` starts where `buf` ends.
    return (flat.dtype == buf.dtype and flat.device == buf.device
            and flat.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and flat.storage_offset() == buf.storage_offset() + buf.numel())


def _divide_(flat: torch.Tensor, n: int) -> None:
    # The sum into an average; integer averages floor.
    if flat.is_floating_point() or flat.is_complex():
        flat.div_(n)
    else:
        flat.floor_divide_(n)


def run_stages_(bufs: list[torch.Tensor], op: str, levels: list[Level], call_id: int, which: str,
                pipelined: bool = True, fill: Callable[[int], None] | None = None,
                drain: Callable[[int], None] | None = None) -> None:
    """Run the multiring's stages on each of `bufs`, the pipeline's chunks (each a whole buffer
    as the stages see it): "allreduce" all of them, "reduce_scatter" its first half (innermost
    level first, leaving each rank its reduced block of every chunk) or "allgather" its second
    half (outermost first). An "allreduce" with op average divides each chunk's sum where it is
    complete, in this rank's block between the halves, so that the allgather spreads the
    quotients: a quarter of the buffer on 4 ranks rather than all of it, with the same result.
    `pipelined`: the chunks flow through the stages together, on this thread (`_interleaved`);
    otherwise they run one after another (NCCL matches p2p messages by order, not tag). `call_id` must be the same on every rank for this call; `levels` all have
    size > 1. `fill(chunk)`, if given, writes chunk buffer `chunk` just before its first stage
    and `drain(chunk)` reads it just after its last, so that preparing and unpacking chunks
    overlap the transfers of the others.
    """
    n = len(levels)
    stages = _stages(n)
    stages = {"allreduce": stages, "reduce_scatter": stages[:n], "allgather": stages[n:]}[which]
    base_tag = (call_id % 4096) << 18

    divide_after = n - 1 if which == "allreduce" and op == "average" else None
    total = math.prod(lv.size for lv in levels)

    def task(s: int, chunk: int) -> Iterator[list]:
        stage = stages[s]
        if fill is not None and s == 0:
            fill(chunk)
        yield from _stage_steps(stage, levels, bufs[chunk], op, base_tag | (stage.index << 12) | (chunk % 4096))
        if s == divide_after:
            start, length = _segment(levels, n, bufs[chunk].numel())
            _divide_(bufs[chunk][start : start + length], total)
        if drain is not None and s == len(stages) - 1:
            drain(chunk)

    if not stages:  # one rank: nothing to move, the buffers as they were filled
        for chunk in range(len(bufs)):
            for step in (fill, drain):
                if step is not None:
                    step(chunk)
    elif pipelined:
        _interleaved(len(stages), len(bufs), task)
    else:
        for chunk in range(len(bufs)):
            for s in range(len(stages)):
                drive(task(s, chunk))


def _interleaved(n_stages: int, n_chunks: int, task: Callable[[int, int], Iterator[list]]) -> None:
    """Run every stage on every chunk, the stages of different chunks at once, from this thread.

    `task(s, c)` is stage s on chunk c: a generator that posts each ring step's messages and
    yields their works. Stage s takes chunk c once it has finished chunk c-1 and stage s-1 has
    finished chunk c, so that while chunk c crosses the servers chunk c+1 is reduced inside
    them. The transfers progress in the backend's own threads; this thread only posts them,
    waits for the oldest outstanding step and folds what it received. Every rank thus posts and
    waits in the same order, whatever the timing, so no rank waits for a message that its peer
    posts only after a wait of its own that cannot end.
    """
    started = [0] * n_stages
    finished = [0] * n_stages
    waiting: collections.deque = collections.deque()  # (stage, its task, the works it waits for)

    def advance(s: int, steps: Iterator[list]) -> None:
        works = next(steps, None)
        if works is None:
            finished[s] += 1
        else:
            waiting.append((s, steps, works))

    def start_ready() -> None:
        moved = True
        while moved:
            moved = False
            for s in range(n_stages):
                c = started[s]
                if c < n_chunks and finished[s] == c and (s == 0 or finished[s - 1] > c):
                    started[s] += 1
                    advance(s, task(s, c))
                    moved = True

    start_ready()
    while waiting:
        s, steps, works = waiting.popleft()
        for w in works:
            w.wait()
        advance(s, steps)
        start_ready()
