"""The Communicator: a set of ranks, their process groups and topology, and the collectives
over them, each through its own engine thread and cross-rank check.

`pyddl.init()` makes the world's communicator; `new_communicator(ranks)` and `split(color)`
make more over subsets of ranks (Horovod's process sets, one per torch ProcessGroup). Each has
its own groups, sequence numbers, engine and heartbeats, so collectives on
different communicators may interleave in any order. Creating one is collective over the
whole job, as torch's `new_group` is: every rank calls it, members or not.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from pyddl.comm import registry
from pyddl.comm.codecs import Codec, get_codec
from pyddl.comm.engine import Engine, Handle, Reorder
from pyddl.comm.fusion import Packing, Part, unpack
from pyddl.comm.guard import AHEAD, AheadCheck, Monitor, NamesDiffer, OpInfo, exchange
from pyddl.comm.layout import DEFAULT_BUCKET_BYTES, plan_buckets
from pyddl.comm.multiring import Level, allreduce_many_
from pyddl.comm.names import negotiate
from pyddl.comm.ring import equal_parts, ring_reduce_scatter_
from pyddl.errors import CollectiveError, NotMemberError, PyddlError
from pyddl.config import Settings
from pyddl.timeline import Timeline
from pyddl.topology.spec import Topology, parse_topology, sub_topology

__all__ = ["Communicator", "REDUCE_OPS", "DTYPES", "check_op", "world_communicator"]

REDUCE_OPS = ("sum", "average", "min", "max", "product")
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.int8,
    torch.uint8,
)


def check_op(op: str) -> str:
    """Validate a reduction name; return it lower-cased."""
    name = str(op).lower()
    if name not in REDUCE_OPS:
        raise ValueError(f"unknown reduction op {op!r}; choose one of {', '.join(REDUCE_OPS)}")
    return name


def _check_tensor(tensor, what: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{what} is a {tensor.layout} tensor; pyddl collectives take dense tensors: "
                        "pass tensor.to_dense(), or reduce it with sparse_allreduce_async")
    if tensor.dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TypeError(f"{what} has dtype {tensor.dtype}; pyddl collectives support {names}")


def _describe(tensor: torch.Tensor, shape=None) -> str:
    dims = ",".join(map(str, tensor.shape if shape is None else shape))
    return f"{str(tensor.dtype).replace('torch.', '')}[{dims}]"


def _key(kind: str, name) -> str | None:
    """What ranks match a named call by: its name with its kind, as Horovod's names are per kind."""
    return None if name is None else f"{kind}.{name}"


def _ranks_text(ranks: Sequence[int]) -> str:
    text = ",".join(map(str, ranks[:16]))
    return text + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


class Communicator:
    """Collectives over a fixed set of ranks, with that set's topology and settings.

    Ranks inside a communicator are numbered 0..size-1 in the order of their job ranks
    (`ranks[i]` is the job rank of communicator rank i); `root=` arguments count in it.
    A process that is not a member holds the communicator too (creation is collective over the
    job) but may not call its collectives.

    Made by `pyddl.init()` (the world) and `Communicator.new_communicator` / `split`; not by hand.
    """

    def __init__(self, *, name: str, ranks: Sequence[int], job_rank: int, topology: Topology,
                 settings: Settings, backend: str, device: torch.device, group, levels: list[Level],
                 store, timeline: Timeline, root: "Communicator | None", owned_groups: Sequence = ()):
        self.name = name
        self.ranks = tuple(ranks)
        self.job_rank = job_rank
        self.topology = topology
        self.settings = settings
        self.backend = backend
        self.device = device
        self.group = group
        self.levels = levels
        self.timeline = timeline
        self._root = root or self
        self._store = store
        self._owned_groups = list(owned_groups)
        self._child_numbers = itertools.count(1)
        self._children: weakref.WeakSet[Communicator] = weakref.WeakSet()
        # What adapters keep per communicator (pyddl.torch: its process sets by ranks); it
        # lives and dies with the communicator, so a job joined again starts without it.
        self.adapter_state: dict[str, Any] = {}
        self.negotiations = 0  # how often ranks at different names negotiated (comm/names.py)
        self.exchanges = 0  # cross-rank checks run (one may cover the calls queued behind it)
        self.shared = 0  # calls run in the pass of the call ahead of them (fusion.Part)
        self.pass_chunks = 0  # chunks those passes ran (fewer than their calls where buffers share chunks)
        self._ahead_check: tuple | None = None  # (AheadCheck, its jobs) in flight (engine thread)
        self._tune_lock = threading.Lock()
        self._tuned = None
        self._destroyed = False
        self._algorithms: dict[str, Callable] = {}
        member = job_rank in self.ranks
        self._rank = self.ranks.index(job_rank) if member else None
        # The engine thread is named pyddl-engine (the world's) with the communicator's name
        # after it for the others, as the step bench's thread table and `top -H` show it.
        engine_name = "pyddl-engine" if root is None else f"pyddl-engine[{name}]"
        self._engine = Engine(wait_limit_s=settings.timeout_s * 2 + 60, name=engine_name) if member else None
        if self._engine is not None:
            self._engine.by_name = settings.check and len(self.ranks) > 1
        self._monitor = (Monitor(store, job_rank, self.ranks, settings.timeout_s, settings.stall_warn, prefix=name)
                         if member and store is not None and len(self.ranks) > 1 else None)

    # Who is where -------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Communicator({self.name!r}, ranks={_ranks_text(self.ranks)}, topology={self.topology.spec})"

    @property
    def is_member(self) -> bool:
        """Whether this process is one of the communicator's ranks."""
        return self._rank is not None

    @property
    def size(self) -> int:
        """The number of ranks."""
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's rank in the communicator (0..size-1)."""
        self._require_member("rank")
        return self._rank

    @property
    def local_rank(self) -> int:
        """This rank's index inside its server (the innermost dim)."""
        return self.topology.coords(self.rank)[0]

    @property
    def local_size(self) -> int:
        """The number of this communicator's ranks on each server (the innermost dim)."""
        return self.topology.dims[0]

    @property
    def cross_rank(self) -> int:
        """The index of this rank's server among the communicator's servers."""
        return self.rank // self.topology.dims[0]

    @property
    def cross_size(self) -> int:
        """The number of servers the communicator spans."""
        return self.size // self.topology.dims[0]

    def _require_member(self, what: str) -> None:
        if self._destroyed:
            raise PyddlError(f"pyddl: communicator {self.name!r} was destroyed; {what} needs a live one")
        if self._rank is None:
            raise NotMemberError(
                f"pyddl: rank {self.job_rank} is not a member of communicator {self.name!r} (ranks "
                f"{_ranks_text(self.ranks)}), so it cannot call {what} on it; only its members can"
            )

    # Running a collective -----------------------------------------------------------------

    def run(self, info: OpInfo, fn: Callable[[int], Any], asynchronous: bool = False, checked: bool = True,
            part: Part | None = None) -> Any:
        """Run `fn(seq)` on the engine as this communicator's collective #seq, checked and guarded.

        For adapters that issue their own collectives over `self.group`: returns fn's result,
        or a Handle when `asynchronous`. `checked=False` skips the cross-rank comparison (and
        with it matching by `info.key`: the call is matched by order). `part` (from
        `fusable`), for an allreduce whose fingerprint covers the part's key: the same
        allreduce as `fn`, in a form that shares one pass with the checked parts of the same
        key queued right behind it (fusion.Part).
        """
        self._require_member(info.name)
        timeline, monitor, engine = self.timeline, self._monitor, self._engine

        def job(seq: int):
            if monitor is not None:
                monitor.enter(seq, info)
            start = timeline.now_us() if timeline.enabled else 0.0
            taken = []
            try:
                if checked and self.settings.check and self.size > 1:
                    self._settle_ahead()
                    if not engine.running_verified:
                        self._match(info, seq, engine.ahead(AHEAD))
                    elif not engine.next_verified():
                        # The last of the calls a check vouched for: check the ones queued
                        # behind it while it moves its data.
                        self._check_ahead()
                if part is not None:
                    taken = engine.take_verified(part.key)
                if taken:
                    self.shared += len(taken)
                    if not engine.next_verified():  # the taken ones were the last vouched for
                        self._check_ahead()
                    result, theirs = self._run_parts([part] + [t.part for t in taken], seq)
                    for t, r in zip(taken, theirs):
                        engine.settle(t, r)
                else:
                    result = fn(seq)
                if monitor is not None:
                    monitor.leave()
                if timeline.enabled:
                    timeline.span(info.name, start, timeline.now_us(), "comm",
                                  {"seq": seq, "call": info.detail[:200], "communicator": self.name,
                                   **({"calls": 1 + len(taken)} if taken else {})})
                return result
            except BaseException as exc:
                error = exc
                if isinstance(exc, RuntimeError) and not isinstance(exc, PyddlError):
                    # Gloo/NCCL timeouts and lost connections
                    error = (CollectiveError(f"pyddl: {info} (collective #{seq}) failed: {exc}") if monitor is None
                             else monitor.diagnose(seq, info, list(self.ranks), exc))
                for t in taken:
                    engine.settle(t, error=error)
                if error is exc:
                    raise
                raise error from exc

        describe = f"{info} (a collective of communicator {self.name!r})"
        key = info.key if checked else None
        # An unnamed checked call can be vouched for by the check of a call ahead of it.
        fp = info.fingerprint if checked and key is None and self.settings.check and self.size > 1 else None
        if part is not None and fp is None:
            part = None  # only a checked call can be taken into another's pass
        if asynchronous:
            return engine.submit(job, describe, key, fp, part)
        return engine.run(job, describe, key, fp, part)

    def _pipelines(self, algorithm: str) -> bool:
        """Whether `algorithm` runs several buffers through one pass here (allreduce_many_): the
        multiring, over more than one rank, on Gloo (NCCL runs its chunks one after another)."""
        return algorithm == "multiring" and self.backend != "nccl" and self.size > 1

    def fusable(self, algorithm: str, numel: int) -> bool:
        """Whether an allreduce of `numel` elements on `algorithm` (a validated name) may share
        a pass with others (fusion.Part): where the algorithm pipelines, with the check on."""
        return self._pipelines(algorithm) and self.settings.check and numel > 0

    def _run_parts(self, parts: list[Part], seq: int) -> tuple[Any, list]:
        """(Engine thread.) The allreduce of every part in one multiring pass, as collective
        #seq; the first part's result and the others'."""
        flats = [p.buffer() for p in parts]
        results: list = [None] * len(parts)

        def fill(i: int) -> None:
            if parts[i].fill is not None:
                parts[i].fill(flats[i])

        def drain(i: int) -> None:
            results[i] = parts[i].finish(flats[i])

        self.pass_chunks += allreduce_many_(self, flats, parts[0].op, seq, fill, drain)
        return results[0], results[1:]

    def _match(self, info: OpInfo, seq: int, ahead: Sequence = ()) -> None:
        """The cross-rank check (engine thread). Where the ranks are at different names, they
        agree on a name and raise Reorder, which runs its job first on every rank. The jobs
        queued behind it (`ahead`, from Engine.ahead) that every rank has alike are marked
        checked."""
        self._settle_ahead()
        self.exchanges += 1
        try:
            rnd = exchange(info, seq, self.group, self.ranks, self.device, self._rank, [j.fp for j in ahead])
        except NamesDiffer as differ:
            raise Reorder(self._negotiate(seq, differ.listing)) from None
        self._engine.verify(ahead[:rnd.ahead_verified])

    def _check_ahead(self) -> None:
        """(Engine thread.) Post the check of the jobs queued behind the running one, to be
        settled when the next checked collective starts (guard.AheadCheck). Posted by every
        rank at the same collective: the last one a check vouched for, which is the same on
        every rank. On NCCL it completes here: two NCCL communicators busy at once can hang."""
        ahead = self._engine.ahead(AHEAD)
        self.exchanges += 1
        self._ahead_check = (AheadCheck([j.fp for j in ahead], self.group, self.size, self.device,
                                        asynchronous=self.backend != "nccl"), ahead)

    def _settle_ahead(self) -> None:
        """(Engine thread.) Wait for the check posted by _check_ahead, if any, and mark the
        jobs it vouched for; before any other exchange, so that every rank's exchanges meet
        in one order."""
        if self._ahead_check is not None:
            check, ahead = self._ahead_check
            self._ahead_check = None
            self._engine.verify(ahead[:check.alike()])

    def _negotiate(self, seq: int, listing: str, joined: bool = False) -> str:
        self.negotiations += 1
        return negotiate(lambda obj: _gather_objects(self, obj), self._engine, self.ranks,
                         self.settings.timeout_s, seq, listing, joined)

    def check_algorithm(self, algorithm: str | None) -> str:
        """Validate an algorithm name (None: the settings'); tune `auto` here if not yet.

        Call it on the thread that issues the collective, before submitting it: tuning is a
        series of collectives, which must take the same place in every rank's order. Tuning
        lazily on the engine thread instead, while other threads kept submitting buckets,
        numbered its collectives differently on each rank, and the job hung.
        """
        alg = (algorithm or self.settings.allreduce).lower()
        if alg not in registry.ALGORITHM_CHOICES:
            raise ValueError(f"unknown allreduce algorithm {algorithm!r}; choose one of "
                             f"{', '.join(registry.ALGORITHM_CHOICES)}")
        if alg == registry.AUTO:
            self.ensure_tuned()
        return alg

    def ensure_tuned(self) -> None:
        """Time the `auto` candidates once (collective: every member in the same order)."""
        with self._tune_lock:
            if self._tuned is None and self.size > 1:
                from pyddl.comm.auto import tune

                self._tuned = tune(self)

    def reduce_buffer_(self, work: torch.Tensor, op: str, algorithm: str, codec: Codec, seq: int,
                       fill: Callable[[int, int], None] | None = None, source: torch.Tensor | None = None) -> None:
        """Allreduce `work` (contiguous, on `self.device`) in place, through `codec`.

        For adapters that pack their own buffers: call it only inside a `run` job (it is
        collective #seq); `op` and `algorithm` must already be validated names. `fill(lo, hi)`,
        if given, writes work.view(-1)[lo:hi]; the multiring calls it chunk by chunk inside its
        pipeline (see `fusion.Packing`), other paths once for the whole buffer. `source`, for a
        codec that applies: the input, contiguous and shaped as `work`, which then only takes
        the result (an out-of-place call, without copying its input into `work` first).
        """
        flat = work.view(-1)
        if codec.applies_to(flat):
            wire = torch.empty(flat.numel(), dtype=codec.wire_dtype, device=flat.device)
            given = flat if source is None else source.view(-1)

            def encode(lo: int, hi: int) -> None:
                # Chunk by chunk inside the multiring's pipeline, like `fill`.
                if fill is not None:
                    fill(lo, hi)
                codec.encode_(given[lo:hi], wire[lo:hi], op, self.size)

            # The wire carries pre-divided values, so a sum of it is already an average.
            self._reduce_flat_(wire, "sum" if op == "average" else op, algorithm, seq, encode)
            codec.decode_(wire, flat, op, self.size)
        else:
            self._reduce_flat_(flat, op, algorithm, seq, fill)

    def _reduce_flat_(self, flat: torch.Tensor, op: str, algorithm: str, seq: int, fill=None) -> None:
        if flat.numel() == 0 or self.size == 1:
            if fill is not None:
                fill(0, flat.numel())
            return  # nothing to move; one rank's sum, min, max or average is its own tensor
        if algorithm == registry.AUTO:
            algorithm = self._tuned.pick(flat.numel() * flat.element_size())  # tuned by check_algorithm
        run = self._algorithms.get(algorithm)
        if run is None:
            run = self._algorithms[algorithm] = registry.load_algorithm(algorithm)
        run(self, flat, op, seq, fill=fill)

    def _to_work(self, tensor: torch.Tensor, copy: bool) -> torch.Tensor:
        if copy or not tensor.is_contiguous() or tensor.device != self.device:
            return tensor.detach().to(self.device, copy=True, memory_format=torch.contiguous_format)
        return tensor.detach()

    def _codec(self, compression) -> Codec:
        return get_codec(self.settings.compression if compression is None else compression)

    # Allreduce ----------------------------------------------------------------------------

    def _allreduce(self, tensor, op, algorithm, compression, inplace: bool, asynchronous: bool, name=None,
                   fill=None):
        self._require_member("allreduce")
        _check_tensor(tensor)
        op, alg, codec = check_op(op), self.check_algorithm(algorithm), self._codec(compression)
        source = None
        if not (inplace or asynchronous) and fill is None and tensor.is_contiguous() and tensor.device == self.device:
            # A blocking out-of-place call: its input cannot change before it returns, so the
            # result's copy of it is made as the allreduce goes, chunk by chunk inside the
            # multiring's pipeline, overlapping the transfers, instead of a whole pass first.
            # A codec reads the input itself: the result then takes only the decoded sum.
            work = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            if codec.applies_to(work):
                source = tensor.detach()
            else:
                given, flat_work = tensor.detach().view(-1), work.view(-1)

                def fill(lo: int, hi: int) -> None:
                    flat_work[lo:hi].copy_(given[lo:hi])
        else:
            work = self._to_work(tensor, copy=not inplace)
        info = OpInfo(
            "allreduce",
            f"{_describe(tensor)} op={op} algorithm={alg} compression={codec.name}",
            join_spec=(((work.numel(), str(work.dtype)),), op, alg, codec.name),
            key=_key("allreduce", name),
        )

        def finish(_=None) -> torch.Tensor:
            if not inplace:
                return work.to(tensor.device) if work.device != tensor.device else work
            if work.data_ptr() != tensor.data_ptr():
                tensor.copy_(work)
            return tensor

        def fn(seq: int) -> torch.Tensor:
            self.reduce_buffer_(work, op, alg, codec, seq, fill, source)
            return finish()

        part = None
        if name is None and not codec.applies_to(work) and self.fusable(alg, work.numel()):
            part = Part(str(work.dtype), op, alg, lambda: work.view(-1),
                        None if fill is None else (lambda flat: fill(0, flat.numel())), finish)
        return self.run(info, fn, asynchronous, part=part)

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None,
                  compression=None) -> torch.Tensor:
        """Reduce `tensor` across the ranks and return the result as a new tensor.

        Args:
            tensor: any shape; float32/float64/float16/bfloat16/int32/int64 (also int8/uint8).
            op: "sum", "average", "min", "max" or "product". Average of integers floors.
            algorithm: "native", "multiring" or "auto"; default: the settings' algorithm.
            compression: "none", "fp16" or "bf16" wire codec for floating-point tensors.

        Returns:
            A tensor of the same shape, dtype and device holding the reduction.

        Raises:
            CollectiveMismatchError: ranks passed different shapes, dtypes or options.
            CollectiveTimeoutError: a rank did not arrive within the timeout (it is named).

        Example:
            >>> pyddl.allreduce(torch.tensor([pyddl.rank() + 1]))  # n(n+1)/2 on every rank
        """
        return self._allreduce(tensor, op, algorithm, compression, inplace=False, asynchronous=False)

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None,
                   compression=None) -> torch.Tensor:
        """Reduce `tensor` across the ranks in place and return it (see `allreduce`)."""
        return self._allreduce(tensor, op, algorithm, compression, inplace=True, asynchronous=False)

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None,
                        compression=None, name: str | None = None) -> Handle:
        """Start `allreduce` in the background; `handle.wait()` returns the new tensor.

        With `name`, the ranks match this call by its name, as Horovod does, rather than by its
        place in their order: named calls may be submitted in a different order on each rank,
        but not past an unnamed call, and a name must be unique among calls in flight
        (docs/horovod.md). The async calls below take `name` alike.
        """
        return self._allreduce(tensor, op, algorithm, compression, inplace=False, asynchronous=True, name=name)

    def allreduce_async_(self, tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None,
                         compression=None, name: str | None = None, *,
                         fill: Callable[[int, int], None] | None = None) -> Handle:
        """Start an in-place allreduce in the background; `handle.wait()` returns `tensor`.

        `fill(lo, hi)`, for adapters that pack their own buffers (see `fusion.Packing`): writes
        tensor.view(-1)[lo:hi] when the allreduce is about to read it, so a contiguous `tensor`
        may be handed over unwritten (e.g. `torch.empty`). The multiring packs chunk by chunk
        inside its pipeline; the other paths fill the whole buffer first.
        """
        if fill is not None and not tensor.is_contiguous():
            raise ValueError("allreduce_async_(fill=...) needs a contiguous tensor: it is filled in place")
        return self._allreduce(tensor, op, algorithm, compression, inplace=True, asynchronous=True, name=name,
                               fill=fill)

    def _grouped(self, tensors, op, algorithm, compression, bucket_bytes, inplace: bool, asynchronous: bool,
                 name=None):
        self._require_member("grouped_allreduce")
        tensors = list(tensors)
        for i, t in enumerate(tensors):
            _check_tensor(t, f"tensors[{i}]")
        op, alg, codec = check_op(op), self.check_algorithm(algorithm), self._codec(compression)
        buckets = plan_buckets([(t.numel(), str(t.dtype), t.element_size()) for t in tensors], bucket_bytes)
        shapes = ";".join(_describe(t) for t in tensors)
        flats = tuple((sum(tensors[i].numel() for i in b), str(tensors[b[0]].dtype)) for b in buckets)
        info = OpInfo(
            "grouped_allreduce",
            f"[{shapes}] op={op} algorithm={alg} compression={codec.name}",
            join_spec=(flats, op, alg, codec.name),
            key=_key("grouped_allreduce", name),
        )
        targets = tensors if inplace else [t.detach().clone() for t in tensors]

        def packed(bucket: list[int]) -> Packing:
            return Packing.back_to_back([targets[i].detach().to(self.device).reshape(-1) for i in bucket], self.device)

        def fn(seq: int) -> list[torch.Tensor]:
            if self._pipelines(alg) and not any(codec.applies_to(targets[b[0]]) for b in buckets):
                # Every bucket in one pipelined pass, as queued calls share one (fusion.Part).
                packings = [packed(b) for b in buckets]

                def fill(i: int) -> None:
                    packings[i].fill(0, packings[i].flat.numel())

                def drain(i: int) -> None:
                    unpack(packings[i].flat, [targets[m].detach() for m in buckets[i]])

                allreduce_many_(self, [p.flat for p in packings], op, seq, fill, drain)
                return targets
            for bucket in buckets:
                packing = packed(bucket)
                self.reduce_buffer_(packing.flat, op, alg, codec, seq, packing.fill)
                unpack(packing.flat, [targets[m].detach() for m in bucket])
            return targets

        return self.run(info, fn, asynchronous)

    def grouped_allreduce(self, tensors: Sequence[torch.Tensor], op: str = "sum", algorithm: str | None = None,
                          compression=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[torch.Tensor]:
        """Allreduce many tensors, fused into flat buckets that close once they hold `bucket_bytes`
        (pyddl.comm.layout.plan_buckets); return new tensors. One collective per bucket instead of
        one per tensor: latency is paid per bucket."""
        return self._grouped(tensors, op, algorithm, compression, bucket_bytes, inplace=False, asynchronous=False)

    def grouped_allreduce_(self, tensors: Sequence[torch.Tensor], op: str = "sum", algorithm: str | None = None,
                           compression=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[torch.Tensor]:
        """Allreduce many tensors in place, fused into flat buckets that close once they hold
        `bucket_bytes`."""
        return self._grouped(tensors, op, algorithm, compression, bucket_bytes, inplace=True, asynchronous=False)

    def grouped_allreduce_async_(self, tensors: Sequence[torch.Tensor], op: str = "sum",
                                 algorithm: str | None = None, compression=None,
                                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, name: str | None = None) -> Handle:
        """Start `grouped_allreduce_` in the background; `handle.wait()` returns the tensors."""
        return self._grouped(tensors, op, algorithm, compression, bucket_bytes, inplace=True, asynchronous=True,
                             name=name)

    # Broadcast, allgather, reduce-scatter, alltoall ----------------------------------------

    def _check_root(self, root: int) -> int:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.size:
            whose = "this job" if self._root is self else f"communicator {self.name!r}"
            raise ValueError(f"broadcast root {root!r} is out of range: {whose} has ranks 0..{self.size - 1}")
        return root

    def _broadcast(self, tensor: torch.Tensor, root: int, inplace: bool, asynchronous: bool, name=None):
        self._require_member("broadcast")
        _check_tensor(tensor)
        root = self._check_root(root)
        work = self._to_work(tensor, copy=not inplace)
        info = OpInfo("broadcast", f"{_describe(tensor)} root={root}", key=_key("broadcast", name))

        def fn(seq: int) -> torch.Tensor:
            if work.numel() and self.size > 1:
                dist.broadcast(work, src=self.ranks[root], group=self.group)
            if not inplace:
                return work.to(tensor.device)
            if work.data_ptr() != tensor.data_ptr():
                tensor.copy_(work)
            return tensor

        return self.run(info, fn, asynchronous)

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Return a new tensor holding rank `root`'s `tensor` on every rank.

        Raises:
            ValueError: `root` is not a rank of this communicator.
        """
        return self._broadcast(tensor, root, inplace=False, asynchronous=False)

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank `root`'s; return it."""
        return self._broadcast(tensor, root, inplace=True, asynchronous=False)

    def broadcast_async_(self, tensor: torch.Tensor, root: int = 0, name: str | None = None) -> Handle:
        """Start `broadcast_` in the background; `handle.wait()` returns `tensor`."""
        return self._broadcast(tensor, root, inplace=True, asynchronous=True, name=name)

    def _allgather(self, tensor: torch.Tensor, asynchronous: bool, name=None):
        self._require_member("allgather")
        _check_tensor(tensor)
        if tensor.dim() == 0:
            raise ValueError("allgather needs a tensor with at least one axis; use tensor.reshape(1)")
        work = self._to_work(tensor, copy=True)
        rest = tuple(tensor.shape[1:])
        info = OpInfo("allgather", _describe(tensor, ("*",) + rest), key=_key("allgather", name))

        def fn(seq: int) -> torch.Tensor:
            return self._gather_rows(work).to(tensor.device)

        return self.run(info, fn, asynchronous)

    def _gather_rows(self, work: torch.Tensor) -> torch.Tensor:
        """(In a job.) Every rank's `work` concatenated along axis 0, whose length may differ."""
        n, rest = self.size, tuple(work.shape[1:])
        counts = [torch.zeros(1, dtype=torch.int64, device=work.device) for _ in range(n)]
        dist.all_gather(counts, torch.tensor([work.shape[0]], dtype=torch.int64, device=work.device),
                        group=self.group)
        rows = [int(c) for c in counts]
        longest = max(rows)
        padded = work
        if work.shape[0] < longest:
            padded = torch.zeros((longest,) + rest, dtype=work.dtype, device=work.device)
            padded[: work.shape[0]] = work
        if longest == 0 or padded.numel() == 0:
            return torch.empty((sum(rows),) + rest, dtype=work.dtype, device=work.device)
        gathered = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:r] for g, r in zip(gathered, rows)])

    def sparse_allreduce_async(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None,
                               inplace: bool = False) -> Handle:
        """Sum or average a sparse COO tensor across ranks; `handle.wait()` returns the result.

        Every rank's indices and values are allgathered and added, as Gloo and Horovod reduce
        sparse tensors, so the bytes grow with the rows touched, not the tensor's size. The
        result is coalesced; with `inplace` it is also copied into `tensor`.
        """
        self._require_member("sparse_allreduce")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_coo:
            raise TypeError("sparse_allreduce takes a sparse COO tensor (tensor.to_sparse()); for a dense "
                            "one use allreduce")
        op = check_op(op)
        if op not in ("sum", "average") or (op == "average" and not tensor.is_floating_point()):
            raise ValueError(f"sparse tensors reduce with op sum, or average for floating point; got {op!r} "
                             f"on {tensor.dtype}")
        local = tensor.coalesce()
        _check_tensor(local.values(), "the sparse tensor's values")
        indices = self._to_work(local.indices().t().contiguous(), copy=False)
        values = self._to_work(local.values().contiguous(), copy=False)
        info = OpInfo("sparse_allreduce", f"{_describe(tensor)} sparse_dim={tensor.sparse_dim()} op={op}",
                      key=_key("sparse_allreduce", name))

        def fn(seq: int) -> torch.Tensor:
            rows, vals = self._gather_rows(indices), self._gather_rows(values)
            # check_invariants: the indices come from peers; one out of range would corrupt memory.
            out = torch.sparse_coo_tensor(rows.t(), vals, tensor.shape, check_invariants=True)
            out = out.coalesce().to(tensor.device)
            if op == "average":
                out = out / self.size
            return tensor.copy_(out) if inplace else out

        return self.run(info, fn, asynchronous=True)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along axis 0, in rank order.

        The first axis may differ across ranks; the other axes and the dtype must match.
        """
        return self._allgather(tensor, asynchronous=False)

    def allgather_async(self, tensor: torch.Tensor, name: str | None = None) -> Handle:
        """Start `allgather` in the background; `handle.wait()` returns the result."""
        return self._allgather(tensor, asynchronous=True, name=name)

    def _reduce_scatter(self, tensor: torch.Tensor, op: str, asynchronous: bool, name=None):
        self._require_member("reduce_scatter")
        _check_tensor(tensor)
        if tensor.dim() == 0:
            raise ValueError("reduce_scatter needs a tensor with at least one axis")
        op = check_op(op)
        work = self._to_work(tensor, copy=True)
        info = OpInfo("reduce_scatter", f"{_describe(tensor)} op={op}", key=_key("reduce_scatter", name))

        def fn(seq: int) -> torch.Tensor:
            n, me = self.size, self.rank
            row = tensor[0].numel() if tensor.shape[0] else 0
            rows = [length for _, length in equal_parts(0, tensor.shape[0], n)]
            parts, offset = [], 0
            for r in rows:
                parts.append((offset, r * row))
                offset += r * row
            flat = work.view(-1)
            ring_reduce_scatter_(flat, parts, list(self.ranks), me, self.group, op, (seq % 4096) << 18)
            start, length = parts[me]
            mine = flat[start : start + length].view((rows[me],) + tuple(tensor.shape[1:]))
            if op == "average":
                mine = mine / n if mine.is_floating_point() else mine.floor_divide(n)
            return mine.clone().to(tensor.device)

        return self.run(info, fn, asynchronous)

    def reduce_scatter(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` across ranks and return this rank's block of rows of the result.

        Axis 0 is split like `torch.tensor_split(tensor, size)`: with R rows on n ranks, the
        first R % n ranks get one row more.
        """
        return self._reduce_scatter(tensor, op, asynchronous=False)

    def reduce_scatter_async(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> Handle:
        """Start `reduce_scatter` in the background; `handle.wait()` returns this rank's rows."""
        return self._reduce_scatter(tensor, op, asynchronous=True, name=name)

    def _alltoall(self, tensor: torch.Tensor, splits, asynchronous: bool, name=None):
        self._require_member("alltoall")
        _check_tensor(tensor)
        n = self.size
        if tensor.dim() == 0:
            raise ValueError("alltoall needs a tensor with at least one axis; use tensor.reshape(1)")
        rows = tensor.shape[0]
        if splits is None:
            if rows % n:
                raise ValueError(f"alltoall without splits sends axis 0 in {n} equal parts, but it has {rows} "
                                 "rows; pass splits= (rows for each rank) or pad the tensor")
            counts = [rows // n] * n
        else:
            counts = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
        if len(counts) != n or any(c < 0 for c in counts) or sum(counts) != rows:
            raise ValueError(f"alltoall splits {counts} must be {n} non-negative row counts summing to axis 0 ({rows})")
        work = self._to_work(tensor, copy=True)
        rest = tuple(tensor.shape[1:])
        # Ranks send different row counts: the check compares the rest of the call.
        info = OpInfo("alltoall", _describe(tensor, ("*",) + rest), key=_key("alltoall", name))

        def fn(seq: int) -> tuple[torch.Tensor, list[int]]:
            recv = torch.empty(n, dtype=torch.int64, device=self.device)
            dist.all_to_all_single(recv, torch.tensor(counts, dtype=torch.int64, device=self.device),
                                   group=self.group)
            received = recv.tolist()
            out = torch.empty((sum(received),) + rest, dtype=work.dtype, device=self.device)
            dist.all_to_all_single(out, work, output_split_sizes=received, input_split_sizes=counts,
                                   group=self.group)
            return out.to(tensor.device), received

        return self.run(info, fn, asynchronous)

    def alltoall(self, tensor: torch.Tensor, splits: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Send `splits[i]` rows of axis 0 to rank i (equal parts without `splits`).

        Returns:
            (the rows received from every rank, in rank order; how many came from each rank).

        Raises:
            ValueError: `splits` does not have one non-negative count per rank summing to axis 0.
        """
        return self._alltoall(tensor, splits, asynchronous=False)

    def alltoall_async(self, tensor: torch.Tensor, splits: Sequence[int] | None = None,
                       name: str | None = None) -> Handle:
        """Start `alltoall` in the background; `handle.wait()` returns (rows, received splits)."""
        return self._alltoall(tensor, splits, asynchronous=True, name=name)

    def barrier(self, name: str | None = None) -> None:
        """Wait until every rank has called barrier (names the missing ranks on timeout).

        Unnamed, it is matched by order, so it also waits for every collective submitted
        before it. `name=` matches it by name, as Horovod's ("barrier.noname"): named calls
        submitted before it on some rank may then run after it.
        """
        self._require_member("barrier")
        self.run(OpInfo("barrier", "", key=_key("barrier", name)),
                 lambda seq: dist.barrier(group=self.group) if self.size > 1 else None)

    def set_check(self, enabled: bool) -> None:
        """Turn the cross-rank check before every collective on or off, on every rank at once.

        The check costs a small allgather, which also covers the calls queued behind the one
        about to run, and the last of those checks the ones queued after it in the background
        (docs/architecture.md): a training step whose gradient buckets queue up waits for 2-3,
        each about 30 ms of exposed time on the emulated 0.5 Gbit/s bed of 2 servers x 2 ranks
        (docs/emulation.md). A script whose collectives have proven to match (say,
        after its first steps) can turn it off. Without it, mismatched calls across ranks are no
        longer a CollectiveMismatchError: they may fail in the backend, time out or, with equal
        sizes, return a wrong result; join() is not available; and named calls are matched by
        order, like the others. Every rank must call it at the same point: it is itself a
        collective, always checked, so a rank that asks for the other setting gets a
        CollectiveMismatchError on every rank. It takes effect from the next collective on every
        rank alike. `PYDDL_CHECK=0` sets the job's start value.
        """
        enabled = bool(enabled)
        info = OpInfo("set_check", f"enabled={enabled}")

        def fn(seq: int) -> None:
            # On the engine thread, between two collectives: every rank switches at the same one.
            if self.size > 1:
                self._match(info, seq)
            self.settings = self.settings.replace(check=enabled)
            self._engine.by_name = enabled and self.size > 1

        self.run(info, fn, checked=False)

    def join(self) -> int:
        """Declare that this rank has no more data; serve the others' allreduces until all join.

        While this rank waits, every allreduce-type collective the other ranks run (allreduce,
        grouped allreduce, gradient buckets) gets this rank's identity element (zeros for a sum,
        so an average still divides by the full size, as in Horovod). Other collectives raise a
        clear error on every rank. Uneven data (a rank with fewer batches) then ends without a hang.

        Returns:
            The rank that joined last.
        """
        from pyddl.comm.join import serve_until_all_joined

        self._require_member("join")
        if self.size == 1:
            return 0
        if not self.settings.check:
            raise PyddlError("join() needs the per-collective exchange, which PYDDL_CHECK=0 turned off")
        def fn(seq: int):
            self._settle_ahead()
            rnd = serve_until_all_joined(self, seq)
            self._engine.skip_to(rnd.max_seq)  # the ranks left their numbers at different values
            return rnd

        return self.run(OpInfo("join", ""), fn, checked=False).last_joined

    # More communicators --------------------------------------------------------------------

    def new_communicator(self, ranks: Sequence[int], topology: str | None = None) -> "Communicator":
        """A communicator over `ranks` (job ranks), with their topology.

        Collective over the whole job, as torch's `new_group` is: every rank calls it with the
        same arguments, members or not (a rank that passes others gets CollectiveMismatchError
        on every rank). Non-members get a handle whose collectives raise NotMemberError.

        Args:
            ranks: distinct job ranks, in any order (they are numbered in sorted order).
            topology: dims innermost first over the subset; default: from where the ranks sit
                (one rank per server of 2 servers x 2 ranks is a 1 x 2 cross-server ring).

        Raises:
            ValueError: ranks empty, repeated or outside the job; a topology that does not fit.
        """
        root = self._root
        size = root.size
        try:
            members = sorted(int(r) for r in ranks)
        except (TypeError, ValueError):
            raise TypeError(f"ranks must be a sequence of job ranks, got {ranks!r}") from None
        if not members or len(set(members)) != len(members) or not all(0 <= r < size for r in members):
            raise ValueError(f"ranks must be distinct job ranks in 0..{size - 1}, at least one, got {list(ranks)}")
        topo = (parse_topology(topology, len(members)) if topology
                else sub_topology(root.topology, members))
        name = f"{root.name}.{next(root._child_numbers)}"
        info = OpInfo("new_communicator", f"ranks={members} topology={topo.spec}")
        timeout = timedelta(seconds=root.settings.timeout_s)
        group, levels, owned = root.run(info, lambda seq: _create_groups(members, topo, root.job_rank, timeout))
        comm = Communicator(name=name, ranks=members, job_rank=root.job_rank, topology=topo,
                            settings=root.settings, backend=root.backend, device=root.device, group=group,
                            levels=levels, store=root._store, timeline=root.timeline, root=root,
                            owned_groups=owned)
        root._children.add(comm)
        return comm

    def split(self, color: int | None, topology: str | None = None) -> "Communicator | None":
        """Split this communicator's ranks by `color` (as MPI_Comm_split): one new communicator
        per distinct color, holding the ranks that passed it.

        Collective over the whole job, like `new_communicator`: every rank calls it on its own
        handle of this communicator; non-members and ranks that want no part pass None.

        Returns:
            The communicator of this rank's color, or None for color None.
        """
        if color is not None and (isinstance(color, bool) or not isinstance(color, int) or color < 0):
            raise ValueError(f"split color must be a non-negative int or None, got {color!r}")
        if color is not None:
            self._require_member("split")
        root = self._root
        colors = root.run(OpInfo("split", f"communicator={self.name}"),
                          lambda seq: _gather_objects(root, color), checked=True)
        by_color: dict[int, list[int]] = {}
        for job_rank, c in enumerate(colors):
            if c is not None:
                if job_rank not in self.ranks:
                    raise ValueError(f"rank {job_rank} passed color {c} to split communicator {self.name!r}, "
                                     "which it is not a member of; non-members pass None")
                by_color.setdefault(c, []).append(job_rank)
        mine = None
        for c in sorted(by_color):
            comm = root.new_communicator(by_color[c], topology=topology)
            if c == color:
                mine = comm
        return mine

    def destroy(self) -> None:
        """Free this communicator's groups and threads (after a barrier of its members).

        Every member calls it; later calls on the communicator raise. The world communicator
        is destroyed by `pyddl.shutdown()`.
        """
        if self._destroyed:
            return
        if self.is_member and self.size > 1:
            try:
                self.barrier()  # no member still has a collective in flight on these groups
            except PyddlError:
                pass  # a broken communicator is freed all the same
        for group in self._owned_groups:
            dist.destroy_process_group(group)
        self.close()

    def close(self) -> None:
        """Stop the engine and heartbeat threads and let go of the process groups (no
        collective). Closing the world closes every communicator made from it.

        torch stops a Gloo group's worker threads only when the last reference to the group
        goes. A group still referenced when the interpreter finalized kept a worker that, on
        dropping the last reference to a finished collective's tensor, took the GIL of a
        finalizing interpreter and aborted the process ("terminate called without an active
        exception", SIGABRT) after the script had succeeded.
        """
        self._destroyed = True
        for part in (self._engine, self._monitor):
            if part is not None:
                part.close()
        self.group, self.levels, self._owned_groups = None, [], []
        for child in list(self._children):
            child.close()



def world_communicator(topology: Topology, settings: Settings, device: torch.device, store,
                       timeline: Timeline) -> Communicator:
    """The communicator of every rank of the job, over torch's default (world) group, which
    must exist; its per-dim groups are created here (collective over the job)."""
    job_rank, size = dist.get_rank(), dist.get_world_size()
    timeout = timedelta(seconds=settings.timeout_s)
    group, levels, _ = _create_groups(list(range(size)), topology, job_rank, timeout, group=dist.group.WORLD)
    return Communicator(name="world", ranks=range(size), job_rank=job_rank, topology=topology,
                        settings=settings, backend=dist.get_backend(), device=device, group=group,
                        levels=levels, store=store, timeline=timeline, root=None)


def _create_groups(members: list[int], topo: Topology, job_rank: int, timeout: timedelta, group=None):
    """Create a subset's process groups: the whole subset's (unless given), and one per slice
    of each dim (with a second one for 2-rank slices: one connection per direction).
    `dist.new_group` is collective over the job: every rank creates every group, in order."""
    owned = []
    if group is None:
        group = dist.new_group(members, timeout=timeout)
        owned = [group] if job_rank in members else []
    levels = []
    for dim, d in enumerate(topo.dims):
        if d == 1:
            continue
        mine = None
        for local in topo.slices(dim):
            ranks = tuple(members[i] for i in local)
            # A group of its own even where the slice is the whole subset: the rings' tagged
            # messages then never share connections with the subset's collectives.
            slice_group = dist.new_group(list(ranks), timeout=timeout)
            reverse = dist.new_group(list(ranks), timeout=timeout) if d == 2 else None
            if job_rank in ranks:
                owned.extend(g for g in (slice_group, reverse) if g is not None)
                mine = Level(d, ranks, ranks.index(job_rank), slice_group, reverse)
        levels.append(mine)
    return group, levels, owned


def _gather_objects(comm: Communicator, obj) -> list:
    everyone: list = [None] * comm.size
    dist.all_gather_object(everyone, obj, group=comm.group)
    return everyone
