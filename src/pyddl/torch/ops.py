"""Horovod's torch op grid on pyddl's core: same names, arguments, defaults and semantics.

Async calls return integer handles, as Horovod's do, for `poll()` and `synchronize()`. Errors
of a collective surface as HorovodInternalError (what Horovod raises from `synchronize`, and
what elastic scripts catch); the message keeps pyddl's detail (ranks, shapes, collective #).
"""

from __future__ import annotations

import itertools
import threading

import torch
import torch.distributed as dist

import pyddl
from pyddl import runtime
from pyddl.comm.guard import OpInfo
from pyddl.errors import CollectiveError

__all__ = [
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "reduce_op_name", "HorovodInternalError",
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size",
    "cross_rank", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "allgather", "allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "alltoall_async", "reducescatter", "reducescatter_async", "poll", "synchronize",
    "join", "barrier", "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled",
    "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built",
]

# Horovod's ReduceOp values.
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_NAMES = {Average: "average", Sum: "sum", Min: "min", Max: "max", Product: "product"}


class HorovodInternalError(CollectiveError):
    """A collective failed (as Horovod raises from synchronize); see the message for who."""


def reduce_op_name(op=None, average=None) -> str:
    """Map Horovod's (op, deprecated average=) to the core op name; Average is the default."""
    if op is not None and average is not None:
        raise ValueError("pass either op= or the deprecated average=, not both")
    if op is None:
        op = Sum if average is False else Average
    if op == Adasum:
        raise NotImplementedError(
            "pyddl does not implement Adasum; use op=hvd.Average (with the linear learning-rate "
            "scaling rule) or op=hvd.Sum"
        )
    if op not in _OP_NAMES:
        raise ValueError(f"unknown reduction op {op!r}; use hvd.Average, Sum, Min, Max or Product")
    return _OP_NAMES[op]


def init(comm=None, process_sets=None) -> None:
    """Join the job (Horovod's comm= and process_sets= are accepted for compatibility only)."""
    if comm is not None or process_sets not in (None, "dynamic"):
        raise ValueError("pyddl runs every collective on all ranks: comm= and process_sets= are not supported")
    pyddl.init()


shutdown, is_initialized = pyddl.shutdown, pyddl.is_initialized
size, rank, local_size, local_rank = pyddl.size, pyddl.rank, pyddl.local_size, pyddl.local_rank
cross_size, cross_rank = pyddl.cross_size, pyddl.cross_rank


def _check_process_set(process_set) -> None:
    if process_set is not None:
        raise ValueError("pyddl runs every collective on all ranks: process_set= must be left unset")


# Handles --------------------------------------------------------------------------------

_handles: dict[int, tuple] = {}  # id -> (pyddl.Handle, name, finish(result) -> output)
_names: set[str] = set()
_ids = itertools.count(1)
_lock = threading.Lock()


def _register(handle, name, finish=lambda out: out) -> int:
    with _lock:
        if name is not None:
            if name in _names:
                raise ValueError(f"a collective named {name!r} is still in flight; names must be unique until synchronized")
            _names.add(name)
        hid = next(_ids)
        _handles[hid] = (handle, name, finish)
    return hid


def poll(handle: int) -> bool:
    """Whether the async operation `handle` has finished (synchronize() then returns at once)."""
    with _lock:
        if handle not in _handles:
            raise ValueError(f"unknown or already synchronized handle {handle!r}")
        return _handles[handle][0].done()


def synchronize(handle: int):
    """Wait for the async operation `handle` and return its output.

    Raises:
        HorovodInternalError: the collective failed (the message names ranks and shapes).
    """
    with _lock:
        if handle not in _handles:
            raise ValueError(f"unknown or already synchronized handle {handle!r}")
        h, name, finish = _handles.pop(handle)
        _names.discard(name)
    try:
        return finish(h.wait())
    except CollectiveError as err:
        raise HorovodInternalError(str(err), getattr(err, "missing_ranks", ())) from err


def _scaled(pre: float, post: float, tensor: torch.Tensor) -> None:
    if (pre != 1.0 or post != 1.0) and not tensor.is_floating_point():
        raise TypeError("prescale_factor and postscale_factor apply to floating-point tensors only")


def _codec(compression) -> str | None:
    return getattr(compression, "codec", None) if compression is not None else None


# Allreduce ------------------------------------------------------------------------------

def _allreduce_async(tensor, inplace, average, name, op, pre, post, process_set, codec=None) -> int:
    _check_process_set(process_set)
    op_name = reduce_op_name(op, average)
    _scaled(pre, post, tensor)
    work = tensor if inplace else tensor.detach().clone()
    if pre != 1.0:
        work.mul_(pre)
    handle = pyddl.allreduce_async_(work, op=op_name, compression=codec)

    def finish(out):
        if post != 1.0:
            out.mul_(post)
        return out

    return _register(handle, name, finish)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None) -> int:
    """Start an allreduce of `tensor`; `synchronize(handle)` returns the reduced copy."""
    return _allreduce_async(tensor, False, average, name, op, prescale_factor, postscale_factor, process_set)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None) -> int:
    """Start an in-place allreduce of `tensor`; `synchronize(handle)` returns it."""
    return _allreduce_async(tensor, True, average, name, op, prescale_factor, postscale_factor, process_set)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Allreduce `tensor` in place (Average by default) and return it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, name, op, pre, post, codec):
        ctx.args = (average, op, pre, post)
        return synchronize(_allreduce_async(tensor, False, average, name, op, pre, post, None, codec))

    @staticmethod
    def backward(ctx, grad):
        average, op, pre, post = ctx.args
        # Horovod: the gradient of an allreduce is the same allreduce of the gradient.
        return synchronize(_allreduce_async(grad.contiguous(), False, average, None, op, pre, post, None)), None, None, None, None, None, None


def allreduce(tensor, average=None, name=None, compression=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Return the allreduce of `tensor` over all ranks (Average by default); differentiable.

    Example:
        >>> hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)   # n(n+1)/2
    """
    _check_process_set(process_set)
    codec = _codec(compression)
    if compression is not None and codec is None:  # a user's own Compressor
        wire, ctx = compression.compress(tensor)
        return compression.decompress(_Allreduce.apply(wire, average, name, op, prescale_factor, postscale_factor, None), ctx)
    return _Allreduce.apply(tensor, average, name, op, prescale_factor, postscale_factor, codec)


def _grouped_async(tensors, inplace, average, name, op, pre, post, process_set) -> int:
    _check_process_set(process_set)
    op_name = reduce_op_name(op, average)
    for t in tensors:
        _scaled(pre, post, t)
    work = list(tensors) if inplace else [t.detach().clone() for t in tensors]
    if pre != 1.0:
        for w in work:
            w.mul_(pre)
    handle = pyddl.grouped_allreduce_async_(work, op=op_name)

    def finish(outs):
        if post != 1.0:
            for o in outs:
                o.mul_(post)
        return outs

    return _register(handle, name, finish)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None) -> int:
    """Start one fused allreduce of a list of tensors; synchronize() returns the reduced copies."""
    return _grouped_async(tensors, False, average, name, op, prescale_factor, postscale_factor, process_set)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None) -> int:
    """As grouped_allreduce_async, in place."""
    return _grouped_async(tensors, True, average, name, op, prescale_factor, postscale_factor, process_set)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Allreduce a list of tensors in place, fused into buckets; return them."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set))


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, average, name, op, pre, post, *tensors):
        ctx.args = (average, op, pre, post)
        return tuple(synchronize(_grouped_async(tensors, False, average, name, op, pre, post, None)))

    @staticmethod
    def backward(ctx, *grads):
        average, op, pre, post = ctx.args
        reduced = synchronize(_grouped_async([g.contiguous() for g in grads], False, average, None, op, pre, post, None))
        return (None, None, None, None, None, *reduced)


def grouped_allreduce(tensors, average=None, name=None, compression=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Return the allreduce of each tensor in the list, fused into buckets; differentiable."""
    _check_process_set(process_set)
    ctxs = [None] * len(tensors)
    if compression is not None:
        pairs = [compression.compress(t) for t in tensors]
        tensors, ctxs = [p[0] for p in pairs], [p[1] for p in pairs]
    outs = _GroupedAllreduce.apply(average, name, op, prescale_factor, postscale_factor, *tensors)
    return [compression.decompress(o, c) if compression is not None else o for o, c in zip(outs, ctxs)]


# Allgather, broadcast, alltoall, reducescatter ------------------------------------------

def allgather_async(tensor, name=None, process_set=None) -> int:
    """Start an allgather (concatenation along axis 0, which may differ across ranks)."""
    _check_process_set(process_set)
    return _register(pyddl.allgather_async(tensor), name)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        ctx.rows = tensor.shape[0]
        return synchronize(allgather_async(tensor, name))

    @staticmethod
    def backward(ctx, grad):
        # Horovod: average the gradient over ranks, keep this rank's rows.
        reduced = synchronize(_allreduce_async(grad.contiguous(), False, None, None, Average, 1.0, 1.0, None))
        rows = synchronize(allgather_async(torch.tensor([ctx.rows])))
        offset = int(rows[: rank()].sum())
        return reduced.narrow(0, offset, ctx.rows), None


def allgather(tensor, name=None, process_set=None):
    """Concatenate every rank's `tensor` along axis 0; differentiable."""
    _check_process_set(process_set)
    return _Allgather.apply(tensor, name)


def _check_root(root_rank) -> None:
    if not isinstance(root_rank, int) or not 0 <= root_rank < size():
        raise ValueError(f"broadcast root_rank {root_rank!r} is out of range: this job has ranks 0..{size() - 1}")


def broadcast_async(tensor, root_rank, name=None, process_set=None) -> int:
    """Start a broadcast from `root_rank`; synchronize() returns a new tensor."""
    _check_process_set(process_set)
    _check_root(root_rank)
    return _register(pyddl.broadcast_async_(tensor.detach().clone(), root=root_rank), name)


def broadcast_async_(tensor, root_rank, name=None, process_set=None) -> int:
    """Start an in-place broadcast from `root_rank`."""
    _check_process_set(process_set)
    _check_root(root_rank)
    return _register(pyddl.broadcast_async_(tensor, root=root_rank), name)


def broadcast_(tensor, root_rank, name=None, process_set=None):
    """Overwrite `tensor` with rank `root_rank`'s, in place; return it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name):
        ctx.root = root_rank
        return synchronize(broadcast_async(tensor, root_rank, name))

    @staticmethod
    def backward(ctx, grad):
        # Horovod: the averaged gradient lands on the root; the other ranks' inputs get zero.
        reduced = synchronize(_allreduce_async(grad.contiguous(), False, None, None, Average, 1.0, 1.0, None))
        if rank() != ctx.root:
            reduced.zero_()
        return reduced, None, None


def broadcast(tensor, root_rank, name=None, process_set=None):
    """Return rank `root_rank`'s `tensor` on every rank; differentiable."""
    _check_process_set(process_set)
    _check_root(root_rank)
    return _Broadcast.apply(tensor, root_rank, name)


def alltoall_async(tensor, splits=None, name=None, process_set=None) -> int:
    """Start an alltoall: rows splits[i] go to rank i; synchronize() returns (output, received_splits)."""
    _check_process_set(process_set)
    n = size()
    if tensor.dim() == 0:
        raise ValueError("alltoall needs a tensor with at least one axis")
    if splits is None:
        if tensor.shape[0] % n:
            raise ValueError(f"alltoall without splits needs axis 0 ({tensor.shape[0]}) divisible by size ({n})")
        splits = [tensor.shape[0] // n] * n
    splits = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    if len(splits) != n or any(s < 0 for s in splits) or sum(splits) != tensor.shape[0]:
        raise ValueError(f"alltoall splits {splits} must be {n} non-negative counts summing to axis 0 ({tensor.shape[0]})")
    rest = tuple(tensor.shape[1:])
    work = tensor.detach().contiguous()
    info = OpInfo("alltoall", f"{str(tensor.dtype).replace('torch.', '')}[*,{','.join(map(str, rest))}]")

    def fn(seq):
        world = runtime.world_group()
        send = torch.tensor(splits, dtype=torch.int64)
        recv = torch.empty(n, dtype=torch.int64)
        dist.all_to_all_single(recv, send, group=world)
        received = [int(r) for r in recv]
        out = torch.empty((sum(received),) + rest, dtype=tensor.dtype, device=tensor.device)
        dist.all_to_all_single(out, work, output_split_sizes=received, input_split_sizes=splits, group=world)
        return out, recv

    return _register(runtime.run_collective(info, fn, asynchronous=True), name)


def alltoall(tensor, splits=None, name=None, process_set=None):
    """Scatter rows of `tensor` to all ranks and gather theirs: returns (output, received_splits)."""
    return synchronize(alltoall_async(tensor, splits, name, process_set))


def reducescatter_async(tensor, name=None, op=Average, process_set=None, prescale_factor=1.0, postscale_factor=1.0) -> int:
    """Start a reduce-scatter (Average by default); rows are split as evenly as possible."""
    _check_process_set(process_set)
    op_name = reduce_op_name(op)
    _scaled(prescale_factor, postscale_factor, tensor)
    work = tensor.detach() * prescale_factor if prescale_factor != 1.0 else tensor

    def finish(out):
        return out.mul_(postscale_factor) if postscale_factor != 1.0 else out

    return _register(pyddl.reduce_scatter_async(work, op=op_name), name, finish)


def reducescatter(tensor, name=None, compression=None, op=Average, process_set=None, prescale_factor=1.0, postscale_factor=1.0):
    """Return this rank's rows of the reduction of `tensor` over all ranks (Average by default)."""
    return synchronize(reducescatter_async(tensor, name, op, process_set, prescale_factor, postscale_factor))


def join(device: int = -1) -> int:
    """This rank has no more data: serve the others' allreduces until every rank joins.

    Returns the rank that joined last (see pyddl.join).
    """
    return pyddl.join()


def barrier(process_set=None) -> None:
    _check_process_set(process_set)
    pyddl.barrier()


# What this build can do, answered truthfully for pyddl on this torch ---------------------

def mpi_threads_supported() -> bool:
    return False  # pyddl does not run its collectives over MPI


def mpi_enabled() -> bool:
    return False


def mpi_built() -> bool:
    return dist.is_mpi_available()


def gloo_built() -> bool:
    return dist.is_gloo_available()


def gloo_enabled() -> bool:
    if dist.is_initialized():
        return dist.get_backend() == "gloo"
    return dist.is_gloo_available()


def nccl_built() -> bool:
    return dist.is_nccl_available() and torch.cuda.is_available()


def ddl_built() -> bool:
    return False  # IBM's DDL library is not used: pyddl re-implements its algorithms in Python


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return torch.backends.cuda.is_built()


def rocm_built() -> bool:
    return torch.version.hip is not None
