"""The multiring allreduce (DDL, Cho et al. 2017): one ring per topology dim, pipelined.

Reduce-scatter along each dim innermost-first (the fast intra-server links first, so the slow
outer links carry only a 1/(d1...d(k-1)) shard), then allgather back in reverse order. A large
buffer is cut into chunks that flow through the 2k stages like a pipeline: while chunk i
crosses the servers, chunk i+1 is reduced inside them ("keep every link busy"). Each stage
runs on its own thread; tagged messages make the cross-rank matching independent of how the
threads interleave. NCCL matches p2p messages by order rather than tag, so on NCCL the
chunks run one after another. `allreduce_` is the entry the algorithm registry calls.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from pyddl.comm.osname import name_this_thread
from pyddl.comm.ring import equal_parts, ring_allgather_, ring_reduce_scatter_

__all__ = ["Level", "StageThreads", "allreduce_", "allreduce_many_", "multiring_allreduce_", "plan_chunks"]


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


def _run_stage(stage: _Stage, levels: list[Level], buf: torch.Tensor, op: str, tag: int) -> None:
    lv = levels[stage.depth]
    parts = equal_parts(*_segment(levels, stage.depth, buf.numel()), lv.size)
    if stage.kind == "rs":
        ring_reduce_scatter_(buf, parts, lv.ranks, lv.coord, lv.send_group, op, tag, lv.recv_group)
    else:
        ring_allgather_(buf, parts, lv.ranks, lv.coord, lv.send_group, tag, lv.recv_group)


def allreduce_(comm, flat: torch.Tensor, op: str, seq: int, fill: Callable[[int, int], None] | None = None) -> None:
    """The registered `multiring` algorithm: `flat` over the communicator's topology levels."""
    multiring_allreduce_(flat, op, comm.levels, comm.settings.chunk_bytes, seq,
                         stage_threads=comm.stage_threads if comm.backend != "nccl" else None, fill=fill)


def multiring_allreduce_(
    flat: torch.Tensor,
    op: str,
    levels: list[Level],
    chunk_bytes: int,
    call_id: int,
    stage_threads: "StageThreads | None" = None,
    fill: Callable[[int, int], None] | None = None,
) -> None:
    """Allreduce the 1-D contiguous tensor `flat` in place over `levels`, innermost first.

    `op` is sum/average/min/max/product; average divides the sum by the number of ranks
    (floor division for integers). `call_id` must be the same on every rank for this call.
    With `stage_threads` the chunks are pipelined through the stages; without, they run one
    after another (NCCL matches p2p messages by order, not tag). `fill(lo, hi)`, if given,
    writes flat[lo:hi] chunk by chunk just before the chunk's first stage.
    """
    levels = [lv for lv in levels if lv.size > 1]
    if not levels or flat.numel() == 0:
        if fill is not None:
            fill(0, flat.numel())
        return
    total = 1
    for lv in levels:
        total *= lv.size
    chunks = plan_chunks(flat.numel(), flat.element_size(), chunk_bytes, total)
    fill_chunk = None if fill is None else (lambda k: fill(chunks[k][0], chunks[k][0] + chunks[k][1]))
    run_stages_([flat[start : start + length] for start, length in chunks], op, levels, call_id, "allreduce",
                stage_threads, fill=fill_chunk)
    if op == "average":
        _divide_(flat, total)


def allreduce_many_(comm, flats: list[torch.Tensor], op: str, seq: int, fill: Callable[[int], None],
                    drain: Callable[[int], None]) -> int:
    """Allreduce each of `flats` (1-D, contiguous) in place in one pass: the chunks of all of
    them flow through the stages back to back, as one buffer's would. `fill(i)` writes flats[i]
    just before its first chunk moves, `drain(i)` reads it after its last (on the pipeline's
    last stage); neither is called for an empty one. Gloo only: it pipelines on the
    communicator's stage threads. Returns the number of chunks the pass ran.

    Consecutive flats that lie back to back in one storage (a DistributedOptimizer's buckets,
    `pyddl.torch.reducer`) are cut into chunks as one buffer, so a chunk may carry the end of
    one and the start of the next: 1 MiB fp16 buckets then move in 2 MiB chunks, half the
    messages. Which flats join depends only on how their owner laid them out, which every
    rank has alike (the reducer's layout is checked across ranks), so every rank cuts the same
    chunks.
    """
    levels = [lv for lv in comm.levels if lv.size > 1]
    total = 1
    for lv in levels:
        total *= lv.size
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
            if op == "average":
                _divide_(flats[i], total)
            drain(i)

    run_stages_(chunks, op, levels, seq, "allreduce", comm.stage_threads, fill=fill_chunk, drain=drain_chunk)
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
                stage_threads: "StageThreads | None" = None, fill: Callable[[int], None] | None = None,
                drain: Callable[[int], None] | None = None) -> None:
    """Run the multiring's stages on each of `bufs`, the pipeline's chunks (each a whole buffer
    as the stages see it): "allreduce" all of them, "reduce_scatter" its first half (innermost
    level first, leaving each rank its reduced block of every chunk) or "allgather" its second
    half (outermost first). With `stage_threads` the chunks are pipelined through the stages;
    without, they run one after another (NCCL matches p2p messages by order, not tag).
    `call_id` must be the same on every rank for this call; `levels` all have size > 1.
    `fill(chunk)`, if given, writes chunk buffer `chunk` just before its first stage and
    `drain(chunk)` reads it just after its last, so that preparing and unpacking chunks overlap
    the transfers of the others.
    """
    n = len(levels)
    stages = _stages(n)
    stages = {"allreduce": stages, "reduce_scatter": stages[:n], "allgather": stages[n:]}[which]
    base_tag = (call_id % 4096) << 18

    def run(stage: _Stage, chunk: int) -> None:
        if fill is not None and stage is stages[0]:
            fill(chunk)
        _run_stage(stage, levels, bufs[chunk], op, base_tag | (stage.index << 12) | (chunk % 4096))
        if drain is not None and stage is stages[-1]:
            drain(chunk)

    if not stages:  # one rank: nothing to move, the buffers as they were filled
        for chunk in range(len(bufs)):
            for step in (fill, drain):
                if step is not None:
                    step(chunk)
    elif stage_threads is not None and len(bufs) > 1 and len(stages) > 1:
        _pipelined(stages, len(bufs), run, stage_threads)
    else:
        for chunk in range(len(bufs)):
            for stage in stages:
                run(stage, chunk)


class StageThreads:
    """Long-lived daemon threads for the pipeline's stages 1..S-1 (stage 0 runs on the caller).

    Starting S-1 threads per allreduce cost about a tenth of the engine's CPU in a training
    step of small buckets; these are started once per communicator and reused. One set per
    communicator: two communicators sharing stage threads could each hold a thread another
    rank's stage waits for, and deadlock across ranks. Daemons, so that a thread stuck in a
    receive from a dead peer never holds the process open at exit.
    """

    def __init__(self, suffix: str = ""):
        self._suffix = suffix  # after each thread's name, pyddl-stage<i>
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def run(self, jobs: list) -> list[threading.Event]:
        """Start each job (a no-argument callable) on a thread of its own; return their
        finished events."""
        with self._lock:
            while len(self._threads) < len(jobs):
                name = f"pyddl-stage{len(self._threads) + 1}{self._suffix}"
                thread = threading.Thread(target=self._loop, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        finished = []
        for job in jobs:
            event = threading.Event()
            self._queue.put((job, event))
            finished.append(event)
        return finished

    def _loop(self) -> None:
        name_this_thread()
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, event = item
            try:
                job()
            finally:
                event.set()
            del item, job  # the finished job's tensors are not kept until the next one

    def close(self) -> None:
        """Stop the threads once they finish their current job."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout=5)


def _pipelined(stages: list[_Stage], n_chunks: int, run, stage_threads: StageThreads) -> None:
    # done[s][c] is set when stage s has finished chunk c; stage s+1 starts chunk c after it.
    done = [[threading.Event() for _ in range(n_chunks)] for _ in stages]
    failed = threading.Event()
    errors: list[BaseException] = []

    def worker(s: int) -> None:
        try:
            for c in range(n_chunks):
                if s > 0:
                    while not done[s - 1][c].wait(0.05):
                        if failed.is_set():
                            return
                run(stages[s], c)
                done[s][c].set()
        except BaseException as exc:  # re-raised on the calling thread below
            errors.append(exc)
            failed.set()

    finished = stage_threads.run([functools.partial(worker, s) for s in range(1, len(stages))])
    worker(0)
    for event in finished:
        event.wait()
    if errors:
        raise errors[0]
