"""Horovod's torch op grid on pyddl's core: same names, arguments, defaults and semantics.

Async calls return integer handles, as Horovod's do, for `poll()` and `synchronize()`. Every
collective failure (shapes or dtypes that differ across ranks, a rank that never arrives) is
raised as HorovodInternalError *from* the core's error, keeping its message (ranks, shapes,
collective #). Process sets are not supported: `process_set=` takes only the global set.
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
    "horovod_errors", "ProcessSet", "global_process_set", "init", "shutdown", "is_initialized",
    "size", "rank", "local_size", "local_rank", "cross_size", "cross_rank", "allreduce",
    "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "allgather", "allgather_async",
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
    """Horovod's process set. pyddl runs every collective on all ranks, so the only set a
    collective accepts is the one holding every rank (`hvd.global_process_set`)."""

    def __init__(self, ranks=None):
        self.ranks = None if ranks is None else sorted(int(r) for r in ranks)

    def size(self) -> int:
        return pyddl.size() if self.ranks is None else len(self.ranks)

    def rank(self) -> int:
        return pyddl.rank() if self.ranks is None else self.ranks.index(pyddl.rank())

    def included(self) -> bool:
        return self.ranks is None or pyddl.rank() in self.ranks

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self.ranks is None else f"ProcessSet(ranks={self.ranks})"


global_process_set = ProcessSet()


def _check_process_set(process_set) -> None:
    if process_set is None or process_set is global_process_set:
        return
    if isinstance(process_set, ProcessSet) and process_set.ranks == list(range(pyddl.size())):
        return
    raise ValueError(
        f"pyddl runs every collective on all ranks, so process_set= takes only hvd.global_process_set, "
        f"got {process_set!r}; drop the argument, or run the subset's work as a pyddl job of its own"
    )


def init(comm=None, process_sets=None) -> None:
    """Join the job described by the environment (`pyddl run`, torchrun, srun, mpirun).

    Args:
        comm: Horovod's MPI communicator or list of ranks; accepted when it spans the whole
            job, since pyddl always uses every rank.
        process_sets: Horovod's static process sets; accepted, and never used: a collective
            given any set but the global one raises ValueError.

    Raises:
        ValueError: `comm` covers only part of the job.
    """
    pyddl.init()
    _export_horovod_environ()
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

def _allreduce_async(tensor, inplace: bool, op: str, name, pre: float, post: float, codec=None) -> int:
    op, post = _average_as_postscale([tensor], op, post, size())
    src = tensor.detach()

    def start():
        work = _wire(_scaled(src, pre))
        if work is src and not inplace:
            return pyddl.allreduce_async(src, op=op, compression=codec)
        return pyddl.allreduce_async_(work, op=op, compression=codec)

    return _submit("allreduce", name, start, lambda out: _result(out, tensor.dtype, post, tensor if inplace else None))


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> int:
    """Start an allreduce of `tensor` (Average by default); synchronize() returns a new tensor.

    The input may be reused at once: it is copied when the call is made.
    """
    _check_process_set(process_set)
    return _allreduce_async(tensor, False, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> int:
    """Start an in-place allreduce of `tensor`; synchronize() returns `tensor`."""
    _check_process_set(process_set)
    return _allreduce_async(tensor, True, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """Allreduce `tensor` in place (Average by default) and return it.

    Raises:
        HorovodInternalError: ranks passed different shapes or dtypes (the message says which).
    """
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, pre, post, codec):
        ctx.args = (op, pre, post)
        return synchronize(_allreduce_async(tensor, False, op, name, pre, post, codec))

    @staticmethod
    def backward(ctx, grad):
        op, pre, post = ctx.args
        # Horovod's definition: the same allreduce (op and scale factors) of the gradients.
        return synchronize(_allreduce_async(grad, False, op, None, pre, post)), None, None, None, None, None


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
        process_set: only hvd.global_process_set.

    Returns:
        A new tensor of the same shape and dtype.

    Raises:
        HorovodInternalError: ranks passed different shapes or dtypes (the message says which).

    Example:
        >>> hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)  # n(n+1)/2
    """
    _check_process_set(process_set)
    op_name = reduce_op_name(op, average)
    codec = _codec(compression)
    if codec is None:
        wire, ctx = compression.compress(tensor)
        return compression.decompress(_Allreduce.apply(wire, op_name, name, prescale_factor, postscale_factor, None), ctx)
    return _Allreduce.apply(tensor, op_name, name, prescale_factor, postscale_factor, codec)


def _grouped_async(tensors, inplace: bool, op: str, name, pre: float, post: float, codec=None) -> int:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_allreduce needs a non-empty list of tensors")
    op, post = _average_as_postscale(tensors, op, post, size())
    srcs = [t.detach() for t in tensors]

    def start():
        work = [_wire(_scaled(s, pre)) for s in srcs]
        if not inplace:
            work = [w.clone() if w is s else w for w, s in zip(work, srcs)]
        return pyddl.grouped_allreduce_async_(work, op=op, compression=codec)

    def finish(outs):
        # Horovod's synchronize() gives a grouped op's outputs as a tuple.
        return tuple(_result(o, t.dtype, post, t if inplace else None) for o, t in zip(outs, tensors))

    return _submit("grouped_allreduce", name, start, finish)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set) -> int:
    """Start one fused allreduce of a list of tensors; synchronize() returns a tuple of new ones."""
    _check_process_set(process_set)
    return _grouped_async(tensors, False, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set) -> int:
    """Start one fused in-place allreduce of a list of tensors; synchronize() returns them (a tuple)."""
    _check_process_set(process_set)
    return _grouped_async(tensors, True, reduce_op_name(op, average), name, prescale_factor, postscale_factor)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    """Allreduce a list of tensors in place, fused into buckets; return them (a tuple, as Horovod)."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set))


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, name, pre, post, codec, *tensors):
        ctx.args = (op, pre, post)
        return tuple(synchronize(_grouped_async(tensors, False, op, name, pre, post, codec)))

    @staticmethod
    def backward(ctx, *grads):
        op, pre, post = ctx.args
        # Horovod's definition, as for allreduce: the same grouped allreduce of the gradients.
        reduced = synchronize(_grouped_async(grads, False, op, None, pre, post))
        return (None, None, None, None, None, *reduced)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """Return the allreduce of each tensor of the list, fused into buckets; differentiable.

    Arguments as for `allreduce`; tensors may differ in shape and dtype.
    """
    _check_process_set(process_set)
    op_name = reduce_op_name(op, average)
    codec = _codec(compression)
    if codec is not None:
        return list(_GroupedAllreduce.apply(op_name, name, prescale_factor, postscale_factor, codec, *tensors))
    pairs = [compression.compress(t) for t in tensors]
    outs = _GroupedAllreduce.apply(op_name, name, prescale_factor, postscale_factor, None, *(w for w, _ in pairs))
    return [compression.decompress(o, c) for o, (_, c) in zip(outs, pairs)]


# Allgather and broadcast ----------------------------------------------------------------

def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    """Start an allgather: concatenation along axis 0, whose length may differ across ranks."""
    _check_process_set(process_set)
    return _submit("allgather", name, lambda: pyddl.allgather_async(_wire(tensor.detach())),
                   lambda out: out.to(tensor.dtype))


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        out = synchronize(allgather_async(tensor, name))
        ctx.rows = tensor.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        # Horovod's definition (horovod#2687): average the gradients over ranks, then keep
        # the rows this rank contributed.
        reduced = synchronize(_allreduce_async(grad, False, "average", None, 1.0, 1.0))
        rows = synchronize(allgather_async(torch.tensor([ctx.rows], dtype=torch.int64)))
        return reduced.narrow(0, int(rows[: rank()].sum()), ctx.rows), None


def allgather(tensor, name=None, process_set=global_process_set):
    """Return every rank's `tensor` concatenated along axis 0, in rank order; differentiable.

    Axis 0 may differ across ranks; the other axes and the dtype must match.
    """
    _check_process_set(process_set)
    return _Allgather.apply(tensor, name)


def _check_root(root_rank) -> int:
    try:
        root = operator.index(root_rank)
    except TypeError:
        raise TypeError(f"root_rank must be an integer rank, got {type(root_rank).__name__}") from None
    if not 0 <= root < size():
        raise ValueError(f"broadcast root_rank {root} is out of range: this job has ranks 0..{size() - 1}")
    return root


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    """Start a broadcast of rank `root_rank`'s `tensor`; synchronize() returns a new tensor.

    Raises:
        ValueError: `root_rank` is not a rank of this job.
    """
    _check_process_set(process_set)
    root = _check_root(root_rank)
    return _submit("broadcast", name, lambda: pyddl.broadcast_async_(_wire(tensor.detach()).clone(), root=root),
                   lambda out: out.to(tensor.dtype))


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    """Start overwriting `tensor` with rank `root_rank`'s; synchronize() returns `tensor`."""
    _check_process_set(process_set)
    root = _check_root(root_rank)
    return _submit("broadcast", name, lambda: pyddl.broadcast_async_(_wire(tensor.detach()), root=root),
                   lambda out: _result(out, tensor.dtype, 1.0, tensor))


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrite `tensor` with rank `root_rank`'s, in place; return it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root, name):
        ctx.root = root
        return synchronize(broadcast_async(tensor, root, name))

    @staticmethod
    def backward(ctx, grad):
        # Horovod's definition (horovod#2687): the averaged gradient on the root, zero elsewhere.
        reduced = synchronize(_allreduce_async(grad, False, "average", None, 1.0, 1.0))
        if rank() != ctx.root:
            reduced.zero_()
        return reduced, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Return rank `root_rank`'s `tensor` on every rank; differentiable.

    Raises:
        ValueError: `root_rank` is not a rank of this job.
    """
    _check_process_set(process_set)
    return _Broadcast.apply(tensor, _check_root(root_rank), name)


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
    _check_process_set(process_set)
    return _submit("alltoall", name, lambda: pyddl.alltoall_async(_wire(tensor.detach()), splits),
                   _received_like(splits, tensor.dtype))


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name):
        out, received = synchronize(alltoall_async(tensor, splits, name))
        ctx.received = received
        if splits is None:
            return out
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, *_):
        # Horovod's definition: send each block of the gradient back where its rows came from.
        back, _ = synchronize(alltoall_async(grad, ctx.received))
        return back, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Scatter blocks of rows of `tensor` to all ranks and gather theirs; differentiable.

    Returns:
        The gathered rows; with `splits` given, (rows, received_splits) as in Horovod.

    Raises:
        ValueError: splits do not sum to axis 0, or axis 0 does not divide by size() without them.
    """
    _check_process_set(process_set)
    return _Alltoall.apply(tensor, splits, name)


def _reducescatter_async(tensor, op: str, name, pre: float, post: float) -> int:
    op, post = _average_as_postscale([tensor], op, post, size())

    def start():
        return pyddl.reduce_scatter_async(_wire(_scaled(tensor.detach(), pre)), op=op)

    return _submit("reducescatter", name, start, lambda out: _result(out, tensor.dtype, post))


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0) -> int:
    """Start a reduce-scatter (Average by default): this rank gets its block of rows of the
    reduction; with R rows on n ranks the first R % n ranks get one row more."""
    _check_process_set(process_set)
    return _reducescatter_async(tensor, reduce_op_name(op), name, prescale_factor, postscale_factor)


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, pre, post):
        ctx.args = (op, pre, post)
        return synchronize(_reducescatter_async(tensor, op, name, pre, post))

    @staticmethod
    def backward(ctx, grad):
        op, pre, post = ctx.args
        if op not in ("sum", "average"):
            raise RuntimeError(f"reducescatter has a gradient for Sum and Average only, not {op}")
        # Horovod's definition: gather the gradient blocks back, times size() for Sum and
        # times the scale factors.
        scale = pre * post * (size() if op == "sum" else 1)
        return synchronize(allgather_async(grad * scale if scale != 1 else grad)), None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Return this rank's block of rows of the reduction of `tensor` over all ranks; differentiable.

    Args as for `allreduce` (Average by default); compression casts for the wire (Horovod's
    compress/decompress). Rows are split as `reducescatter_async` says.
    """
    _check_process_set(process_set)
    op_name = reduce_op_name(op)
    compression = Compression.none if compression is None else compression
    wire, ctx = compression.compress(tensor)
    return compression.decompress(_Reducescatter.apply(wire, op_name, name, prescale_factor, postscale_factor), ctx)


class _Together:
    """Several core handles waited on as one: `wait()` returns their results, in order."""

    def __init__(self, handles: list):
        self._handles = handles

    def done(self) -> bool:
        return all(h.done() for h in self._handles)

    def wait(self) -> list:
        return [h.wait() for h in self._handles]


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    """Start an allgather of each tensor of the list; synchronize() returns the list of results."""
    _check_process_set(process_set)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_allgather needs a non-empty list of tensors")
    return _submit("grouped_allgather", name,
                   lambda: _Together([pyddl.allgather_async(_wire(t.detach())) for t in tensors]),
                   lambda outs: [o.to(t.dtype) for o, t in zip(outs, tensors)])


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> list:
    """Return `allgather` of each tensor of the list (Horovod's grouped_allgather; not
    differentiable here: use allgather per tensor for gradients)."""
    return synchronize(grouped_allgather_async(tensors, name, process_set))


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0) -> int:
    """Start a reduce-scatter of each tensor of the list; synchronize() returns the list of blocks."""
    _check_process_set(process_set)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_reducescatter needs a non-empty list of tensors")
    op_name = reduce_op_name(op)
    plans = [_average_as_postscale([t], op_name, postscale_factor, size()) for t in tensors]
    return _submit(
        "grouped_reducescatter", name,
        lambda: _Together([pyddl.reduce_scatter_async(_wire(_scaled(t.detach(), prescale_factor)), op=o)
                           for t, (o, _) in zip(tensors, plans)]),
        lambda outs: [_result(out, t.dtype, post) for out, t, (_, post) in zip(outs, tensors, plans)])


def grouped_reducescatter(tensors, name=None, compression=None, op=Average, process_set=global_process_set,
                          prescale_factor=1.0, postscale_factor=1.0) -> list:
    """Return `reducescatter` of each tensor of the list (Average by default; not
    differentiable here: use reducescatter per tensor for gradients)."""
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
    """Wait until every rank has called barrier (a rank that never comes is named)."""
    _check_process_set(process_set)
    with horovod_errors():
        pyddl.barrier()
