"""Horovod's collectives on jax.Arrays and whole pytrees, through pyddl's core.

Each call checks that every rank passes the same pytree, then makes one fused core collective
per dtype. Called on concrete arrays it runs at once. Called under `jax.jit` (on tracers),
allreduce, broadcast and reduce_scatter become one `jax.experimental.io_callback(...,
ordered=True)`: XLA runs ordered callbacks in program order, and the computations that hold
them in the order they were dispatched, so every rank submits its collectives in the same
order. allgather (whose result shape depends on the other ranks) and barrier stay outside jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy  # noqa: F401 (jax.numpy.zeros in _tracing)
import torch
from jax.experimental import io_callback

import pyddl
from pyddl.jax import tree as _tree
from pyddl.jax._core import core

__all__ = [
    "Average", "Sum", "Min", "Max", "Product",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "allreduce", "allgather", "broadcast", "reduce_scatter", "barrier",
]

Average, Sum, Min, Max, Product = "average", "sum", "min", "max", "product"
_OPS = (Average, Sum, Min, Max, Product)


def init(**kwargs) -> None:
    """Join the job (reads pyddl run, torchrun, srun or mpirun); the arguments of `pyddl.init`."""
    pyddl.init(**kwargs)


def shutdown() -> None:
    """Wait for JAX's pending callbacks (their collectives), then leave the job."""
    jax.effects_barrier()
    pyddl.shutdown()


def is_initialized() -> bool:
    return pyddl.is_initialized()


def rank() -> int:
    return core().rank


def size() -> int:
    return core().size


def local_rank() -> int:
    return core().local_rank


def local_size() -> int:
    return core().local_size


def cross_rank() -> int:
    return core().cross_rank


def cross_size() -> int:
    return core().cross_size


def _tracing(leaves: _tree.Leaves | None = None) -> bool:
    # Under jit, leaves closed over are concrete but a new array is a tracer: a collective on
    # them must still run at every call of the computation, not once while it is traced.
    return (leaves is not None and leaves.traced()) or isinstance(jax.numpy.zeros((), "int8"), jax.core.Tracer)


def _run(what: str, leaves: _tree.Leaves, host, out_like, in_jit: bool = True):
    """Run `host(values) -> values` now, or inside jit as one ordered io_callback."""
    if not _tracing(leaves):
        # Callbacks of computations already dispatched hold earlier collectives: submit ours after.
        jax.effects_barrier()
        return leaves.unflatten(host(leaves.values))
    if not in_jit:
        raise TypeError(f"pyddl.jax.{what} cannot run inside jax.jit (its result shape depends on the other "
                        f"ranks); call it outside the jitted function")
    structs = tuple(jax.ShapeDtypeStruct(like.shape, like.dtype) for like in out_like)
    outs = io_callback(lambda *values: tuple(host(values)), structs, *leaves.values, ordered=True)
    return leaves.unflatten(outs)


def _check_op(op) -> str:
    name = str(op).lower()
    if name not in _OPS:
        raise ValueError(f"unknown reduction op {op!r}; choose one of {', '.join(_OPS)}")
    return name


def allreduce(tree, op: str = Average, compression=None, algorithm: str | None = None):
    """Reduce every leaf of `tree` across all ranks; return a pytree of new jax.Arrays.

    Leaves are fused into one core collective per dtype. Works on concrete arrays and inside
    `jax.jit` (an ordered io_callback).

    Args:
        tree: a jax.Array or any pytree of them (numbers and numpy arrays are taken too);
            dtypes float32/float64/float16/bfloat16/int32/int64/int8/uint8; empty leaves allowed.
        op: Average (default, as in Horovod), Sum, Min, Max or Product. Average of integers floors.
        compression: None, "fp16" or "bf16": the core's wire codec for floating-point leaves.
        algorithm: "native", "multiring" or "auto" (default: the job's setting).

    Returns:
        The same structure, each leaf of the same dtype, shape and sharding.

    Raises:
        CollectiveMismatchError: ranks passed different pytrees (the first differing leaf and
            the ranks are named), shapes or options.
        CollectiveTimeoutError: a rank did not arrive within the timeout (it is named).

    Example:
        >>> hvd.allreduce({"w": jnp.full(3, hvd.rank() + 1.0)}, op=hvd.Sum)  # n(n+1)/2 each
    """
    comm = core()
    leaves = _tree.flatten(tree, "allreduce")
    op, codec = _check_op(op), pyddl.get_codec(compression).name

    def host(values):
        _tree.agree("allreduce", leaves)
        outs = list(values)  # an empty leaf is its own result
        pending = []
        for indices in _tree.buckets(leaves).values():
            packing = _tree.pack(values, indices)  # filled chunk by chunk inside the allreduce
            handle = comm.allreduce_async_(packing.flat, op=op, algorithm=algorithm, compression=codec,
                                           fill=packing.fill)
            pending.append((handle, packing.flat, packing.spans, indices))
        for handle, buf, spans, indices in pending:
            handle.wait()
            for (off, n), i in zip(spans, indices):
                outs[i] = _tree.to_jax(buf[off: off + n], values[i])
        return outs

    return _run("allreduce", leaves, host, leaves.values)


def broadcast(tree, root_rank: int = 0):
    """Return rank `root_rank`'s `tree` on every rank (one fused broadcast per dtype; jit too).

    Example:
        >>> params = hvd.broadcast(params, root_rank=0)
    """
    comm = core()
    leaves = _tree.flatten(tree, "broadcast")

    def host(values):
        _tree.agree("broadcast", leaves)
        outs = list(values)  # an empty leaf is its own result
        for indices in _tree.buckets(leaves).values():
            packing = _tree.pack(values, indices)
            packing.fill(0, packing.flat.numel())
            buf, spans = packing.flat, packing.spans
            comm.broadcast_(buf, root_rank)
            for (off, n), i in zip(spans, indices):
                outs[i] = _tree.to_jax(buf[off: off + n], values[i])
        return outs

    return _run("broadcast", leaves, host, leaves.values)


def allgather(tree):
    """Concatenate every rank's leaves along axis 0, in rank order (outside jit only).

    The first axis of a leaf may differ across ranks; the rest, the dtypes and the structure
    must match. One allgather of the row counts, then one per dtype.

    Example:
        >>> hvd.allgather(jnp.full((hvd.rank() + 1, 2), hvd.rank()))  # 1 + 2 + ... rows
    """
    comm = core()
    leaves = _tree.flatten(tree, "allgather", min_axes=1)

    def host(values):
        rows = _tree.agree("allgather", leaves, [int(v.shape[0]) for v in values], free_first_axis=True)
        outs = [jax.ShapeDtypeStruct((sum(r[i] for r in rows),) + v.shape[1:], v.dtype) for i, v in enumerate(values)]
        # Empty leaves stay in: a leaf with no rows here may have rows on another rank.
        for indices in _tree.buckets(leaves, skip_empty=False).values():
            flat = torch.cat([_tree.as_torch(values[i]).reshape(-1) for i in indices])
            gathered = comm.allgather(flat)
            parts, at = {i: [] for i in indices}, 0
            for r in rows:  # rank r's leaves, packed in the same order
                for i in indices:
                    numel = r[i] * math.prod(values[i].shape[1:])
                    parts[i].append(gathered[at: at + numel])
                    at += numel
            for i in indices:
                outs[i] = _tree.to_jax(torch.cat(parts[i]), outs[i])
        return outs

    return _run("allgather", leaves, host, None, in_jit=False)


def reduce_scatter(tree, op: str = Average):
    """Reduce every leaf across ranks; return this rank's block of rows of each (jit too).

    Axis 0 of each leaf is split like `numpy.array_split(leaf, size())`: with R rows on n
    ranks, the first R % n ranks get one row more. One fused core collective per dtype.

    Example:
        >>> hvd.reduce_scatter(jnp.ones((2 * hvd.size(), 3)), op=hvd.Sum)  # 2 rows of size()
    """
    comm = core()
    leaves = _tree.flatten(tree, "reduce_scatter", min_axes=1)
    op = _check_op(op)
    n, me = comm.size, comm.rank

    def block(length: int, j: int) -> tuple[int, int]:
        base, extra = divmod(length, n)
        return j * base + min(j, extra), base + (1 if j < extra else 0)

    mine = [(block(v.shape[0], me)[1],) + tuple(v.shape[1:]) for v in leaves.values]
    out_like = [jax.ShapeDtypeStruct(s, v.dtype) for s, v in zip(mine, leaves.values)]

    def host(values):
        _tree.agree("reduce_scatter", leaves)
        outs = [_tree.empty_like(v, s) if v.size == 0 else None for v, s in zip(values, mine)]
        for indices in _tree.buckets(leaves).values():
            # Row j of the buffer holds every leaf's block j, so the core's split of the rows
            # hands rank j exactly its blocks.
            sources = {i: _tree.as_torch(values[i]) for i in indices}
            blocks = [[sources[i][slice(*_span(block(values[i].shape[0], j)))] for i in indices] for j in range(n)]
            width_of = [max(int(b[k].numel()) for b in blocks) for k in range(len(indices))]
            dtype = sources[indices[0]].dtype
            itemsize = torch.empty(0, dtype=dtype).element_size()
            offsets, width = [], 0
            for w in width_of:
                offsets.append(width)
                width += _tree._aligned(w, itemsize)
            buf = torch.zeros((n, width), dtype=dtype, device=comm.device)
            for j in range(n):
                for k, b in enumerate(blocks[j]):
                    buf[j, offsets[k]: offsets[k] + b.numel()].copy_(b.reshape(-1))
            row = comm.reduce_scatter(buf, op=op)
            for k, i in enumerate(indices):
                numel = math.prod(mine[i])
                outs[i] = _tree.to_jax(row[0, offsets[k]: offsets[k] + numel], out_like[i])
        return outs

    return _run("reduce_scatter", leaves, host, out_like)


def _span(start_length: tuple[int, int]) -> tuple[int, int]:
    start, length = start_length
    return start, start + length


def barrier() -> None:
    """Wait until every rank has called barrier (after this rank's pending jit callbacks)."""
    if _tracing():
        raise TypeError("pyddl.jax.barrier cannot run inside jax.jit; call it between jitted steps")
    jax.effects_barrier()
    core().barrier()
