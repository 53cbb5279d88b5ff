"""Horovod's torch op grid on pyddl's core: same names, arguments, defaults and semantics.

Async calls return integer handles, as Horovod's do, for `poll()` and `synchronize()`. Every
collective failure (shapes or dtypes that differ across ranks, a rank that never arrives) is
raised as HorovodInternalError *from* the core's error, keeping its message (ranks, shapes,
collective #). Process sets are pyddl communicators (pyddl.new_communicator), each with its
own topology, engine and collective numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import threading
import warnings
from typing import Callable

import torch

import pyddl
from pyddl.errors import CollectiveError
from pyddl.torch.compression import Compression

__all__ = [
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "reduce_op_name", "HorovodInternalError",
    "horovod_errors", "ProcessSet", "global_process_set", "add_process_set", "remove_process_set", "init", "shutdown", "is_initialized",
    "size", "rank", "local_size", "local_rank", "cross_size", "cross_rank", "allreduce",
    "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "sparse_allreduce_async", "allgather", "allgather_async",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async",
    "reducescatter", "reducescatter_async", "grouped_allgather", "grouped_allgather_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "start_timeline", "stop_timeline",
    "is_homogeneous", "poll", "synchronize", "join", "barrier",
]

# Horovod's ReduceOp values (its C++ enum), so scripts that store or compare them still work.
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_NAMES = {Average: "average", Sum: "sum", Min: "min", Max: "max", Product: "product"}


class HorovodInternalError(CollectiveError):
    """A collective failed, as Horovod raises from synchronize(); the message says who and why.

    It is raised *from* pyddl's own error (CollectiveMismatchError, CollectiveTimeoutError...),
    which stays available as `__cause__`. Like Horovod's, it is a RuntimeError.
    """


@contextlib.contextmanager
def horovod_errors():
    """Re-raise pyddl's collective errors inside the block as HorovodInternalError."""
    try:
        yield
    except HorovodInternalError:
        raise
    except CollectiveError as err:
        raise HorovodInternalError(str(err), err.missing_ranks) from err


def reduce_op_name(op=None, average=None) -> str:
    """Return the core op name for Horovod's `op=` and its deprecated `average=` flag.

    Args:
        op: hvd.Average (the default when None), Sum, Min, Max or Product.
        average: deprecated since Horovod 0.19: true means Average, false means Sum.

    Returns:
        "average", "sum", "min", "max" or "product".

    Raises:
        ValueError: both op and average were given, or op is not a Horovod op.
        NotImplementedError: op is hvd.Adasum.
    """
    if op is not None and average is not None:
        raise ValueError("pass either op= or the deprecated average=, not both (op= supersedes average=)")
    if op is None:
        if average is not None:
            warnings.warn("average= is deprecated (Horovod 0.19): use op=hvd.Average or op=hvd.Sum",
                          DeprecationWarning, stacklevel=3)
        op = Average if average is None or average else Sum
    if op == Adasum:
        raise NotImplementedError(
            "pyddl does not implement Adasum; use op=hvd.Average with the learning rate scaled by "
            "hvd.size() (Goyal et al. 2017, with warmup for large batches), or op=hvd.Sum"
        )
    if op not in _OP_NAMES:
        raise ValueError(f"unknown reduction op {op!r}; use hvd.Average, hvd.Sum, hvd.Min, hvd.Max or hvd.Product")
    return _OP_NAMES[op]


class ProcessSet:
    """Horovod's process set: a subset of the job's ranks whose collectives run among
    themselves, on a pyddl Communicator of their own (with the subset's topology).

    Make it with `hvd.add_process_set(ranks)` (or `hvd.init(process_sets=[...])`) on every
    rank, members or not, as Horovod requires; then pass it as `process_set=`. Ranks are job
    ranks; `broadcast`'s `root_rank` is a job rank too, as in Horovod.
    """

    def __init__(self, ranks):
        try:
            self.ranks = sorted(operator.index(r) for r in ranks)
        except TypeError:
            raise ValueError(f"a ProcessSet takes a list of ranks, got {ranks!r}") from None
        self.process_set_id: int | None = None
        self._comm = None

    def size(self) -> int | None:
        """The number of ranks (None until registered, as Horovod)."""
        return None if self.process_set_id is None else len(self.ranks)

    def rank(self) -> int | None:
        """This process's rank in the set (-1 outside it; None until registered)."""
        if self.process_set_id is None:
            return None
        return self.ranks.index(pyddl.rank()) if pyddl.rank() in self.ranks else -1

    def included(self) -> bool | None:
        """Whether this process is in the set (None until registered)."""
        return None if self.process_set_id is None else pyddl.rank() in self.ranks

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


class _GlobalProcessSet(ProcessSet):
    """Every rank of the job: the world communicator."""

    def __init__(self):
        self.process_set_id = 0

    @property
    def ranks(self) -> list[int]:
        return list(range(pyddl.size()))

    @property
    def _comm(self):
        return pyddl.world()

    def __repr__(self) -> str:
        return "ProcessSet(process_set_id=0, ranks=every rank)"


global_process_set = _GlobalProcessSet()


def add_process_set(process_set) -> ProcessSet:
    """Register a process set (a ProcessSet or a list of job ranks) and return it.

    Collective over the whole job, as in Horovod: every rank calls it with the same ranks,
    members or not. Its collectives run on a new pyddl Communicator over those ranks.

    Raises:
        ValueError: ranks empty, repeated or outside the job, the set is registered already,
            or a registered set (the global one included) has the same ranks, as in Horovod.
    """
    if not isinstance(process_set, ProcessSet):
        process_set = ProcessSet(process_set)
    if process_set.process_set_id is not None:
        raise ValueError(f"{process_set!r} is registered already")
    registered = _registered()
    if tuple(process_set.ranks) in registered or process_set.ranks == list(range(pyddl.size())):
        raise ValueError(f"Attempted to add a duplicate process set: {process_set!r} has the ranks of one "
                         "registered already; use that one")
    with horovod_errors():
        comm = pyddl.new_communicator(process_set.ranks)
    process_set._comm = comm
    process_set.process_set_id = int(comm.name.rsplit(".", 1)[1])  # "world.<n>": unique in the job
    registered[tuple(process_set.ranks)] = process_set
    return process_set


def remove_process_set(process_set: ProcessSet) -> bool:
    """Free a registered process set's communicator (collective: every rank calls it).

    Returns:
        Whether it was removed: False for the global set or a set not registered.
    """
    if process_set is global_process_set or process_set.process_set_id is None:
        return False
    _registered().pop(tuple(process_set.ranks), None)
    process_set._comm.destroy()
    process_set._comm, process_set.process_set_id = None, None
    return True


def _registered() -> dict:
    """This job's registered process sets by their ranks (kept on the world communicator)."""
    return pyddl.world().adapter_state.setdefault("horovod_process_sets", {})


def _comm_of(process_set):
    """The Communicator a collective with `process_set=` runs on."""
    if process_set is None or process_set is global_process_set:
        return pyddl.world()
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"process_set must be a hvd.ProcessSet, got {type(process_set).__name__}")
    if process_set._comm is None:
        if process_set.ranks == list(range(pyddl.size())):
            return pyddl.world()
        raise ValueError(f"{process_set!r} is not registered: call hvd.add_process_set() with it on every rank first")
    return process_set._comm


def init(comm=None, process_sets=None) -> None:
    """Join the job described by the environment (`pyddl run`, torchrun, srun, mpirun).

    Args:
        comm: Horovod's MPI communicator or list of ranks; accepted when it spans the whole
            job, since pyddl always uses every rank.
        process_sets: Horovod's static process sets (ProcessSet objects or rank lists),
            registered here as add_process_set() does, in order.

    Raises:
        ValueError: `comm` covers only part of the job.
    """
    pyddl.init()
    _export_horovod_environ()
    for process_set in process_sets or []:
        add_process_set(process_set)
    if comm is None:
        return
    n = pyddl.size()
    spans = comm.Get_size() == n if hasattr(comm, "Get_size") else sorted(comm) == list(range(n))
    if not spans:
        raise ValueError(
            f"init(comm=...) must span all {n} ranks of this job: pyddl runs collectives on every "
            "rank; launch the subset as a job of its own instead"
        )


def export_launch_environ() -> None:
    """Set HOROVOD_RANK and HOROVOD_SIZE from the launcher's RANK and WORLD_SIZE (torchrun's
    contract, which `pyddl run` follows), where unset: Horovod's launcher sets them before a
    script starts, and scripts read them before hvd.init() (to choose process sets, say)."""
    for ours, theirs in (("HOROVOD_RANK", "RANK"), ("HOROVOD_SIZE", "WORLD_SIZE")):
        if theirs in os.environ:
            os.environ.setdefault(ours, os.environ[theirs])


def _export_horovod_environ() -> None:
    """Set HOROVOD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE, _CROSS_RANK and _CROSS_SIZE, as
    Horovod's launcher does, from what init() learned (the servers are known only now)."""
    os.environ.update(
        HOROVOD_RANK=str(pyddl.rank()), HOROVOD_SIZE=str(pyddl.size()),
        HOROVOD_LOCAL_RANK=str(pyddl.local_rank()), HOROVOD_LOCAL_SIZE=str(pyddl.local_size()),
        HOROVOD_CROSS_RANK=str(pyddl.cross_rank()), HOROVOD_CROSS_SIZE=str(pyddl.cross_size()),
    )


def shutdown() -> None:
    """Leave the job; handles not yet synchronized are dropped, as in Horovod."""
    with _lock:
        _handles.clear()
        _in_flight.clear()
    pyddl.shutdown()


is_initialized = pyddl.is_initialized
size, rank, local_size, local_rank = pyddl.size, pyddl.rank, pyddl.local_size, pyddl.local_rank
cross_size, cross_rank = pyddl.cross_size, pyddl.cross_rank


# Handles --------------------------------------------------------------------------------

_handles: dict[int, tuple] = {}  # handle -> (pyddl.Handle, reserved (kind, name) or None, finish)
_in_flight: set[tuple[str, str]] = set()
_ids = itertools.count(1)
_lock = threading.Lock()


def _submit(kind: str, name, start: Callable[[], pyddl.Handle], finish: Callable | None = None) -> int:
    """Reserve `name` (per kind of op, as Horovod prefixes names), start the op, return a handle."""
    key = None if name is None else (kind, str(name))
    with _lock:
        if key in _in_flight:
            raise ValueError(
                f"{kind} {name!r} is still in flight; a name must stay unique until synchronize() "
                "returns for it: synchronize the first one, or pick another name"
            )
        if key is not None:
            _in_flight.add(key)
    try:
        core_handle = start()
    except BaseException:
        with _lock:
            _in_flight.discard(key)
        raise
    with _lock:
        handle = next(_ids)
        _handles[handle] = (core_handle, key, finish)
    return handle


def poll(handle: int) -> bool:
    """Return whether the async op `handle` has finished (synchronize() then returns at once).

    Raises:
        ValueError: `handle` is unknown or already synchronized.
    """
    with _lock:
        entry = _handles.get(handle)
    if entry is None:
        raise ValueError(f"handle {handle!r} is unknown or already synchronized")
    return entry[0].done()


def synchronize(handle: int):
    """Wait for the async op `handle` and return its output (None for a handle already
    synchronized, as in Horovod).

    Raises:
        HorovodInternalError: the collective failed (the message names ranks and shapes).
    """
    with _lock:
        entry = _handles.pop(handle, None)
        if entry is not None:
            _in_flight.discard(entry[1])
    if entry is None:
        return None
    core_handle, _, finish = entry
    with horovod_errors():
        out = core_handle.wait()
    return finish(out) if finish is not None else out


# Horovod's dtypes the backend lacks travel as a wider one and come back in their own.
_WIRE_DTYPES = {torch.int16: torch.int32}


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or a copy in the dtype it travels as (int16 as int32)."""
    wide = _WIRE_DTYPES.get(tensor.dtype)
    return tensor if wide is None else tensor.to(wide)


def _scaled(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """`tensor` times `factor` as Horovod scales a buffer (ScaleBufferCPUImpl): integers in
    float64 and truncated toward zero, float16/bfloat16 in float32; `tensor` itself for 1."""
    if factor == 1.0:
        return tensor
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return (tensor.float() * factor).to(tensor.dtype)
    if not tensor.is_floating_point():
        return (tensor.double() * factor).to(tensor.dtype)  # float -> int truncates toward zero
    return tensor * factor


def _average_as_postscale(tensors, op: str, post: float, n: int) -> tuple[str, float]:
    """Horovod averages as a sum times postscale_factor / n. For integers that product is
    truncated toward zero (-75 / 2 = -37.5 gives -37), where the core's average floors."""
    if op == "average" and any(not t.is_floating_point() for t in tensors):
        return "sum", post / n
    return op, post


def _result(out: torch.Tensor, dtype: torch.dtype, post: float, into: torch.Tensor | None = None) -> torch.Tensor:
    """The core's output times postscale_factor, in `dtype`; copied into `into` for an in-place op."""
    out = _scaled(out, post).to(dtype)
    if into is None:
        return out
    if out.data_ptr() != into.data_ptr():
        into.detach().copy_(out)
    return into


def _codec(compression) -> str | None:
    """The core codec of a built-in Compression; None for a user's own Compressor."""
    return "none" if compression is None else getattr(compression, "codec", None)


# Allreduce ------------------------------------------------------------------------------

def _allreduce_async(comm, tensor, inplace: bool, op: str, name, pre: float, post: float, codec=None) -> int:
    op, post = _average_as_postscale([tensor], op, post, comm.size)
    src = tensor.detach()

    def start():
        work = _wire(_scaled(src, pre))
        if work is src and not inplace:
            return comm.allreduce_async(src, op=op, compression=codec, name=name)
        return comm.allreduce_async_(work, op=op, compression=codec, name=name)

    return _submit("allreduce", name, start, lambda out: _result(out, tensor.dtype, post, tensor if inplace else None))


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> int:
    """Start an allreduce of `tensor` (Average by default); synchronize() returns a new tensor.

    The input may be reused at once: it is copied when the call is made.
    """
    comm = _comm_of(process_set)
    return _allreduce_async(comm, tensor, False, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> int:
    """Start an in-place allreduce of `tensor`; synchronize() returns `tensor`."""
    comm = _comm_of(process_set)
    return _allreduce_async(comm, tensor, True, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """Allreduce `tensor` in place (Average by default) and return it.

    Raises:
        HorovodInternalError: ranks passed different shapes or dtypes (the message says which).
    """
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, comm, op, name, pre, post, codec):
        ctx.args = (comm, op, pre, post)
        return synchronize(_allreduce_async(comm, tensor, False, op, name, pre, post, codec))

    @staticmethod
    def backward(ctx, grad):
        comm, op, pre, post = ctx.args
        # Horovod's definition: the same allreduce (op and scale factors) of the gradients.
        return synchronize(_allreduce_async(comm, grad, False, op, None, pre, post)), None, None, None, None, None, None


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """Return the allreduce of `tensor` over all ranks (Average by default); differentiable.

    Args:
        tensor: any shape; float32/64, float16, bfloat16, int64/32/16/8, uint8 (int16 travels
            as int32: Gloo has no int16).
        average: deprecated: True for Average, False for Sum.
        name: optional; unique among ops still in flight.
        compression: hvd.Compression.none/fp16/bf16 (the core's wire codec, pre-divided so
            fp16 cannot overflow) or a Horovod-style Compressor of your own.
        op: hvd.Average, Sum, Min, Max or Product. Average of integers truncates toward zero
            (Horovod's sum times 1/size in float64: -37.5 gives -37).
        prescale_factor, postscale_factor: multiply before and after the reduction; integers
            are scaled in float64 and truncated toward zero, as Horovod does.
        process_set: the ranks to reduce over (hvd.add_process_set); default: every rank.

    Returns:
        A new tensor of the same shape and dtype.

    Raises:
        HorovodInternalError: ranks passed different shapes or dtypes (the message says which).

    Example:
        >>> hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)  # n(n+1)/2
    """
    comm = _comm_of(process_set)
    op_name = reduce_op_name(op, average)
    codec = _codec(compression)
    if codec is None:
        wire, ctx = compression.compress(tensor)
        return compression.decompress(_Allreduce.apply(wire, comm, op_name, name, prescale_factor, postscale_factor,
                                                       None), ctx)
    return _Allreduce.apply(tensor, comm, op_name, name, prescale_factor, postscale_factor, codec)


def _grouped_async(comm, tensors, inplace: bool, op: str, name, pre: float, post: float, codec=None) -> int:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_allreduce needs a non-empty list of tensors")
    op, post = _average_as_postscale(tensors, op, post, comm.size)
    srcs = [t.detach() for t in tensors]

    def start():
        work = [_wire(_scaled(s, pre)) for s in srcs]
        if not inplace:
            work = [w.clone() if w is s else w for w, s in zip(work, srcs)]
        return comm.grouped_allreduce_async_(work, op=op, compression=codec, name=name)

    def finish(outs):
        # Horovod's synchronize() gives a grouped op's outputs as a tuple.
        return tuple(_result(o, t.dtype, post, t if inplace else None) for o, t in zip(outs, tensors))

    return _submit("grouped_allreduce", name, start, finish)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set) -> int:
    """Start one fused allreduce of a list of tensors; synchronize() returns a tuple of new ones."""
    return _grouped_async(_comm_of(process_set), tensors, False, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set) -> int:
    """Start one fused in-place allreduce of a list of tensors; synchronize() returns them (a tuple)."""
    return _grouped_async(_comm_of(process_set), tensors, True, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    """Allreduce a list of tensors in place, fused into buckets; return them (a tuple, as Horovod)."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set))


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, op, name, pre, post, codec, *tensors):
        ctx.args = (comm, op, pre, post)
        return tuple(synchronize(_grouped_async(comm, tensors, False, op, name, pre, post, codec)))

    @staticmethod
    def backward(ctx, *grads):
        comm, op, pre, post = ctx.args
        # Horovod's definition, as for allreduce: the same grouped allreduce of the gradients.
        reduced = synchronize(_grouped_async(comm, grads, False, op, None, pre, post))
        return (None, None, None, None, None, None, *reduced)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """Return the allreduce of each tensor of the list, fused into buckets; differentiable.

    Arguments as for `allreduce`; tensors may differ in shape and dtype.
    """
    comm = _comm_of(process_set)
    op_name = reduce_op_name(op, average)
    codec = _codec(compression)
    if codec is not None:
        return list(_GroupedAllreduce.apply(comm, op_name, name, prescale_factor, postscale_factor, codec, *tensors))
    pairs = [compression.compress(t) for t in tensors]
    outs = _GroupedAllreduce.apply(comm, op_name, name, prescale_factor, postscale_factor, None, *(w for w, _ in pairs))
    return [compression.decompress(o, c) for o, (_, c) in zip(outs, pairs)]


def sparse_allreduce_async(tensor, name, op, process_set=global_process_set):
    """Start reducing a sparse gradient (Horovod's): its indices and values are allgathered and
    summed, then averaged for op=Average. Returns a function that waits and returns the result."""
    handle = _comm_of(process_set).sparse_allreduce_async(tensor.detach(), op=reduce_op_name(op), name=name)

    def wait():
        with horovod_errors():
            return handle.wait()

    return wait


# Allgather and broadcast ----------------------------------------------------------------

def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    """Start an allgather: concatenation along axis 0, whose length may differ across ranks."""
    comm = _comm_of(process_set)
    return _submit("allgather", name, lambda: comm.allgather_async(_wire(tensor.detach()), name=name),
                   lambda out: out.to(tensor.dtype))


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        out = synchronize(allgather_async(tensor, name, process_set))
        ctx.rows, ctx.process_set = tensor.shape[0], process_set
        return out

    @staticmethod
    def backward(ctx, grad):
        # Horovod's definition (horovod#2687): average the gradients over ranks, then keep
        # the rows this rank contributed.
        comm = _comm_of(ctx.process_set)
        reduced = synchronize(_allreduce_async(comm, grad, False, "average", None, 1.0, 1.0))
        rows = synchronize(allgather_async(torch.tensor([ctx.rows], dtype=torch.int64), None, ctx.process_set))
        return reduced.narrow(0, int(rows[: comm.rank].sum()), ctx.rows), None, None


def allgather(tensor, name=None, process_set=global_process_set):
    """Return every rank's `tensor` concatenated along axis 0, in rank order; differentiable.

    Axis 0 may differ across ranks; the other axes and the dtype must match.
    """
    _comm_of(process_set)
    return _Allgather.apply(tensor, name, process_set)


def _check_root(root_rank, comm=None) -> int:
    """Check a job rank `root_rank`; return its rank in `comm` (default: the world)."""
    try:
        root = operator.index(root_rank)
    except TypeError:
        raise TypeError(f"root_rank must be an integer rank, got {type(root_rank).__name__}") from None
    if not 0 <= root < size():
        raise ValueError(f"broadcast root_rank {root} is out of range: this job has ranks 0..{size() - 1}")
    if comm is None:
        return root
    if root not in comm.ranks:
        raise ValueError(f"broadcast root_rank {root} is not in the process set (ranks {list(comm.ranks)})")
    return comm.ranks.index(root)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    """Start a broadcast of rank `root_rank`'s `tensor`; synchronize() returns a new tensor.

    Raises:
        ValueError: `root_rank` is not a rank of this job.
    """
    comm = _comm_of(process_set)
    root = _check_root(root_rank, comm)
    return _submit("broadcast", name,
                   lambda: comm.broadcast_async_(_wire(tensor.detach()).clone(), root=root, name=name),
                   lambda out: out.to(tensor.dtype))


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    """Start overwriting `tensor` with rank `root_rank`'s; synchronize() returns `tensor`."""
    comm = _comm_of(process_set)
    root = _check_root(root_rank, comm)
    return _submit("broadcast", name, lambda: comm.broadcast_async_(_wire(tensor.detach()), root=root, name=name),
                   lambda out: _result(out, tensor.dtype, 1.0, tensor))


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrite `tensor` with rank `root_rank`'s, in place; return it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root, name, process_set):
        ctx.root, ctx.process_set = root, process_set
        return synchronize(broadcast_async(tensor, root, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        # Horovod's definition (horovod#2687): the averaged gradient on the root, zero elsewhere.
        reduced = synchronize(_allreduce_async(_comm_of(ctx.process_set), grad, False, "average", None, 1.0, 1.0))
        if rank() != ctx.root:
            reduced.zero_()
        return reduced, None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Return rank `root_rank`'s `tensor` on every rank; differentiable.

    Raises:
        ValueError: `root_rank` is not a rank of this job.
    """
    _check_root(root_rank, _comm_of(process_set))
    return _Broadcast.apply(tensor, operator.index(root_rank), name, process_set)


# Alltoall and reducescatter -------------------------------------------------------------

def _received_like(splits, dtype: torch.dtype) -> Callable:
    """Horovod returns the received splits as int32 on the CPU, or like `splits` if a tensor."""
    like = splits if isinstance(splits, torch.Tensor) else torch.empty(0, dtype=torch.int32)

    def finish(out):
        rows, received = out
        return rows.to(dtype), torch.tensor(received, dtype=like.dtype, device=like.device)

    return finish


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """Start an alltoall: splits[i] rows of axis 0 go to rank i (equal parts without splits).

    synchronize() returns (output, received_splits): the rows from every rank in rank order,
    and how many came from each.
    """
    comm = _comm_of(process_set)
    return _submit("alltoall", name, lambda: comm.alltoall_async(_wire(tensor.detach()), splits, name=name),
                   _received_like(splits, tensor.dtype))


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        out, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.received, ctx.process_set = received, process_set
        if splits is None:
            return out
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, *_):
        # Horovod's definition: send each block of the gradient back where its rows came from.
        back, _ = synchronize(alltoall_async(grad, ctx.received, None, ctx.process_set))
        return back, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Scatter blocks of rows of `tensor` to all ranks and gather theirs; differentiable.

    Returns:
        The gathered rows; with `splits` given, (rows, received_splits) as in Horovod.

    Raises:
        ValueError: splits do not sum to axis 0, or axis 0 does not divide by size() without them.
    """
    _comm_of(process_set)
    return _Alltoall.apply(tensor, splits, name, process_set)


def _reducescatter_async(comm, tensor, op: str, name, pre: float, post: float) -> int:
    op, post = _average_as_postscale([tensor], op, post, comm.size)

    def start():
        return comm.reduce_scatter_async(_wire(_scaled(tensor.detach(), pre)), op=op, name=name)

    return _submit("reducescatter", name, start, lambda out: _result(out, tensor.dtype, post))


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0) -> int:
    """Start a reduce-scatter (Average by default): this rank gets its block of rows of the
    reduction; with R rows on n ranks the first R % n ranks get one row more."""
    return _reducescatter_async(_comm_of(process_set), tensor, reduce_op_name(op), name, prescale_factor, postscale_factor)


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, comm, op, name, pre, post):
        ctx.args = (comm, op, pre, post)
        return synchronize(_reducescatter_async(comm, tensor, op, name, pre, post))

    @staticmethod
    def backward(ctx, grad):
        comm, op, pre, post = ctx.args
        if op not in ("sum", "average"):
            raise RuntimeError(f"reducescatter has a gradient for Sum and Average only, not {op}")
        # Horovod's definition: gather the gradient blocks back, times size() for Sum and
        # times the scale factors.
        scale = pre * post * (comm.size if op == "sum" else 1)
        gathered = comm.allgather_async(grad * scale if scale != 1 else grad)
        with horovod_errors():
            return gathered.wait(), None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Return this rank's block of rows of the reduction of `tensor` over all ranks; differentiable.

    Args as for `allreduce` (Average by default); compression casts for the wire (Horovod's
    compress/decompress). Rows are split as `reducescatter_async` says.
    """
    comm = _comm_of(process_set)
    op_name = reduce_op_name(op)
    compression = Compression.none if compression is None else compression
    wire, ctx = compression.compress(tensor)
    return compression.decompress(_Reducescatter.apply(wire, comm, op_name, name, prescale_factor, postscale_factor),
                                  ctx)


class _Together:
    """Several core handles waited on as one: `wait()` returns their results, in order."""

    def __init__(self, handles: list):
        self._handles = handles

    def done(self) -> bool:
        return all(h.done() for h in self._handles)

    def wait(self) -> list:
        return [h.wait() for h in self._handles]


def _part(name, i: int):
    """The name of a grouped op's i-th collective: ranks match each by it."""
    return None if name is None else f"{name}[{i}]"


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    """Start an allgather of each tensor of the list; synchronize() returns the list of results."""
    comm = _comm_of(process_set)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_allgather needs a non-empty list of tensors")
    return _submit("grouped_allgather", name,
                   lambda: _Together([comm.allgather_async(_wire(t.detach()), name=_part(name, i))
                                      for i, t in enumerate(tensors)]),
                   lambda outs: [o.to(t.dtype) for o, t in zip(outs, tensors)])


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> list:
    """Return `allgather` of each tensor of the list (Horovod's grouped_allgather);
    differentiable, with allgather's gradient for each tensor."""
    tensors = list(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return [allgather(t, process_set=process_set) for t in tensors]  # one autograd node each
    return synchronize(grouped_allgather_async(tensors, name, process_set))


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0) -> int:
    """Start a reduce-scatter of each tensor of the list; synchronize() returns the list of blocks."""
    comm = _comm_of(process_set)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_reducescatter needs a non-empty list of tensors")
    op_name = reduce_op_name(op)
    plans = [_average_as_postscale([t], op_name, postscale_factor, comm.size) for t in tensors]
    return _submit(
        "grouped_reducescatter", name,
        lambda: _Together([comm.reduce_scatter_async(_wire(_scaled(t.detach(), prescale_factor)), op=o,
                                                     name=_part(name, i))
                           for i, (t, (o, _)) in enumerate(zip(tensors, plans))]),
        lambda outs: [_result(out, t.dtype, post) for out, t, (_, post) in zip(outs, tensors, plans)])


def grouped_reducescatter(tensors, name=None, compression=None, op=Average, process_set=global_process_set,
                          prescale_factor=1.0, postscale_factor=1.0) -> list:
    """Return `reducescatter` of each tensor of the list (Average by default);
    differentiable, with reducescatter's gradient for each tensor."""
    tensors = list(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):  # one autograd node each
        return [reducescatter(t, compression=compression, op=op, process_set=process_set,
                              prescale_factor=prescale_factor, postscale_factor=postscale_factor) for t in tensors]
    compression = Compression.none if compression is None else compression
    pairs = [compression.compress(t) for t in tensors]
    outs = synchronize(grouped_reducescatter_async([w for w, _ in pairs], name, op, process_set,
                                                   prescale_factor, postscale_factor))
    return [compression.decompress(o, c) for o, (_, c) in zip(outs, pairs)]


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Record a Chrome-trace timeline of every collective into `file_path` until stop_timeline().

    Every rank calls it. Each rank writes `<file_path>.rank<N>`; stop_timeline() merges them
    into `file_path` on rank 0 (pyddl's timeline format, docs/timeline.md; Horovod's
    NEGOTIATE/CYCLE events do not exist here, so `mark_cycles` is accepted and unused).
    """
    pyddl.world().timeline.start(str(file_path))


def stop_timeline() -> None:
    """Stop the timeline start_timeline() began and write its file (collective: every rank)."""
    timeline = pyddl.world().timeline
    if not timeline.enabled:
        return
    timeline.close()
    barrier()  # every rank's file is complete before rank 0 merges
    if rank() == 0:
        timeline.merge()
    timeline.stop()


def is_homogeneous() -> bool:
    """True: pyddl's topology gives every server the same number of ranks (local_size())."""
    pyddl.world()  # raises before init, as Horovod's does
    return True


def join(device: int = -1) -> int:
    """Declare that this rank has no more data; serve the others' allreduces until all join.

    Args:
        device: Horovod's device for the zeros a joined rank contributes; pyddl uses its
            collective device, so this is accepted and not needed.

    Returns:
        The rank that joined last.
    """
    with horovod_errors():
        return pyddl.join()


def barrier(process_set=global_process_set) -> None:
    """Wait until every rank of the set has called barrier (a rank that never comes is named).

    Matched by name, as Horovod's (its BARRIER_TENSOR_NAME, "barrier.noname"): a named async
    op one rank submitted before the barrier and another after it still pairs up.
    """
    comm = _comm_of(process_set)
    with horovod_errors():
        comm.barrier(name="noname")
