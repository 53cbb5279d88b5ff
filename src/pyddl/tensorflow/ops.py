"""Horovod's TensorFlow op grid on pyddl's core: same names, arguments, defaults and gradients.

Every op takes tf.Tensor or tf.Variable, runs eagerly or inside tf.function (as a host
callback, see bridge.py), and is synchronous, as in Horovod's TF API. Failures are raised as
HorovodInternalError from the core's error (in tf.function TF re-raises them as a tf.errors
type carrying the same message). `device_dense`, `device_sparse`, `name` and
`ignore_name_scope` are accepted and unused: pyddl runs collectives where its job does.
"""

from __future__ import annotations

import tensorflow as tf

import pyddl
from pyddl.tensorflow import bridge
from pyddl.tensorflow.bridge import (
    cross_rank, cross_size, init, is_initialized, local_rank, local_size, rank, shutdown, size,
)
from pyddl.tensorflow.compression import Compression
from pyddl.torch.ops import (
    Adasum, Average, HorovodInternalError, Max, Min, Product, ProcessSet, Sum, _check_root,
    global_process_set, reduce_op_name,
)

__all__ = [
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "HorovodInternalError", "ProcessSet",
    "global_process_set", "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank",
    "cross_size", "cross_rank", "allreduce", "grouped_allreduce", "allgather", "broadcast", "alltoall",
    "reducescatter", "join", "barrier", "size_op", "rank_op", "local_size_op", "local_rank_op",
]


def _check_process_set(process_set) -> None:
    """pyddl.tensorflow runs every collective on all ranks: only the global set (or a set of
    every rank) is accepted."""
    if process_set is None or process_set is global_process_set:
        return
    if isinstance(process_set, ProcessSet) and process_set.ranks == list(range(pyddl.size())):
        return
    raise ValueError(f"pyddl runs every collective on all ranks in pyddl.tensorflow, so process_set= takes only "
                     f"hvd.global_process_set, got {process_set!r}; pyddl.torch has process sets")


def size_op(process_set_id=0, name=None):
    """size() as a tf.int32 scalar (Horovod's graph-mode query)."""
    return tf.constant(size(), dtype=tf.int32)


def rank_op(name=None):
    return tf.constant(rank(), dtype=tf.int32)


def local_size_op(name=None):
    return tf.constant(local_size(), dtype=tf.int32)


def local_rank_op(name=None):
    return tf.constant(local_rank(), dtype=tf.int32)


# Autograph need not rewrite these: their Python control flow is on Python values, and TF runs
# the ops they emit. Left to it, it would inspect (and rewrite) pyddl's modules at every trace.
_no_autograph = tf.autograph.experimental.do_not_convert


def _check_scale(tensor, pre: float, post: float) -> None:
    if (pre != 1.0 or post != 1.0) and not tensor.dtype.is_floating:
        raise TypeError(
            f"prescale_factor and postscale_factor scale floating-point tensors, got {tensor.dtype.name}; "
            "cast the tensor (tf.cast) or leave both factors at 1.0"
        )


def _codec(compression) -> str | None:
    """The core codec of a built-in Compression; None for a user's own Compressor."""
    return "none" if compression is None else getattr(compression, "codec", None)


def _differentiable(fn, grad_fn, *xs):
    """fn(*xs) with grad_fn(dy) as its gradient where the inputs are floating point."""
    if not all(x.dtype.is_floating for x in xs):
        return fn(*xs)

    @tf.custom_gradient
    def op(*args):
        return fn(*args), grad_fn

    return op(*xs)


# Allreduce ------------------------------------------------------------------------------

def _allreduce(x, op: str, codec: str | None, pre: float, post: float):
    def run(x):
        return bridge.host_call(lambda t: [bridge.allreduce(t, op, codec, pre, post)], [x], [x.dtype], [x.shape])[0]

    # Horovod's gradient: the same allreduce (op and scale factors) of the gradient.
    return _differentiable(run, lambda dy: _allreduce(dy, op, None, pre, post), x)


def _sparse_allreduce(slices: tf.IndexedSlices, op: str, pre: float, post: float) -> tf.IndexedSlices:
    # Horovod's way: allgather the values and the indices; an Average divides the values.
    if op not in ("sum", "average"):
        raise NotImplementedError("only Sum and Average are supported with tf.IndexedSlices")
    if pre != 1.0 or post != 1.0:
        raise NotImplementedError("prescale_factor and postscale_factor are not supported with tf.IndexedSlices")
    values, indices = allgather(slices.values), allgather(slices.indices)
    if op == "average":
        values = values / tf.cast(size(), values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=slices.dense_shape)


@_no_autograph
def allreduce(tensor, average=None, device_dense="", device_sparse="", compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, name=None, process_set=global_process_set,
              ignore_name_scope=False):
    """Return the reduction of `tensor` over all ranks (Average by default); differentiable.

    Args:
        tensor: tf.Tensor, tf.Variable or tf.IndexedSlices (allgathered, as Horovod does);
            float32/64, float16, bfloat16, int32/64, int8, uint8.
        average: deprecated: True for Average, False for Sum.
        compression: hvd.Compression.none/fp16/bf16 (the core's wire codec, divided before
            the cast so fp16 cannot overflow) or a Horovod-style Compressor of your own.
        op: hvd.Average, Sum, Min, Max or Product; Adasum raises NotImplementedError. An
            Average of integers floors.
        prescale_factor, postscale_factor: multiply before and after the reduction (floats).
        process_set: only hvd.global_process_set.

    Returns:
        A tensor of the same shape and dtype.

    Raises:
        HorovodInternalError: ranks passed different shapes or dtypes (the message says which).

    Example:
        >>> hvd.allreduce(tf.constant([hvd.rank() + 1.0]), op=hvd.Sum)  # n(n+1)/2
    """
    _check_process_set(process_set)
    op_name = reduce_op_name(op, average)
    if isinstance(tensor, tf.IndexedSlices):
        return _sparse_allreduce(tensor, op_name, prescale_factor, postscale_factor)
    tensor = tf.convert_to_tensor(tensor)
    _check_scale(tensor, prescale_factor, postscale_factor)
    codec = _codec(compression)
    if codec is None:
        wire, ctx = compression.compress(tensor)
        return compression.decompress(_allreduce(wire, op_name, None, prescale_factor, postscale_factor), ctx)
    return _allreduce(tensor, op_name, codec, prescale_factor, postscale_factor)


def _grouped(xs: list, op: str, codec: str | None, pre: float, post: float) -> list:
    def run(*xs):
        return bridge.host_call(lambda *ts: bridge.grouped_allreduce(list(ts), op, codec, pre, post), list(xs),
                                [x.dtype for x in xs], [x.shape for x in xs])

    # Horovod's gradient, as for allreduce: the same grouped allreduce of the gradients.
    return _differentiable(run, lambda *dys: _grouped(list(dys), op, None, pre, post), *xs)


@_no_autograph
def grouped_allreduce(tensors, average=None, device_dense="", device_sparse="", compression=Compression.none,
                      op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """Return the allreduce of each tensor of the list, fused into buckets (one host call);
    differentiable. Arguments as for `allreduce`; tensors may differ in shape and dtype."""
    _check_process_set(process_set)
    op_name = reduce_op_name(op, average)
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    if not tensors:
        return []
    for t in tensors:
        _check_scale(t, prescale_factor, postscale_factor)
    codec = _codec(compression)
    if codec is not None:
        return list(_grouped(tensors, op_name, codec, prescale_factor, postscale_factor))
    pairs = [compression.compress(t) for t in tensors]
    outs = _grouped([w for w, _ in pairs], op_name, None, prescale_factor, postscale_factor)
    return [compression.decompress(o, c) for o, (_, c) in zip(outs, pairs)]


# Allgather and broadcast ----------------------------------------------------------------

def _allgather_grad(x, dy):
    # Horovod's definition: average the gradients over ranks, then keep this rank's rows.
    reduced = _allreduce(dy, "average", None, 1.0, 1.0)
    rows = allgather(tf.reshape(tf.shape(x, out_type=tf.int64)[0], [1]))
    start = tf.reduce_sum(rows[: rank()])
    return tf.slice(reduced, tf.concat([[start], tf.zeros([tf.rank(reduced) - 1], tf.int64)], 0),
                    tf.shape(x, out_type=tf.int64))


@_no_autograph
def allgather(tensor, name=None, ignore_name_scope=False, process_set=global_process_set):
    """Return every rank's `tensor` concatenated along axis 0, in rank order; differentiable.

    Axis 0 may differ across ranks; the other axes and the dtype must match.
    """
    _check_process_set(process_set)
    x = tf.convert_to_tensor(tensor)
    if x.shape.rank == 0:
        raise ValueError("allgather needs a tensor with at least one axis; use tf.reshape(t, [1])")

    def run(x):
        shape = tf.TensorShape([None]).concatenate(x.shape[1:])
        return bridge.host_call(lambda t: [bridge.allgather(t)], [x], [x.dtype], [shape])[0]

    return _differentiable(run, lambda dy: _allgather_grad(x, dy), x)


@_no_autograph
def broadcast(tensor, root_rank, name=None, ignore_name_scope=False, process_set=global_process_set):
    """Return rank `root_rank`'s `tensor` on every rank; differentiable.

    Raises:
        ValueError: `root_rank` is not a rank of this job.
    """
    _check_process_set(process_set)
    root = _check_root(root_rank)
    x = tf.convert_to_tensor(tensor)

    def run(x):
        return bridge.host_call(lambda t: [bridge.broadcast(t, root)], [x], [x.dtype], [x.shape])[0]

    def grad(dy):
        # Horovod's definition: the averaged gradient on the root, zero elsewhere.
        reduced = _allreduce(dy, "average", None, 1.0, 1.0)
        return reduced if rank() == root else reduced * 0

    return _differentiable(run, grad, x)


# Alltoall and reducescatter -------------------------------------------------------------

def _alltoall_counts(x, splits) -> list[int] | tf.Tensor:
    n = size()
    if splits is None:
        rows = x.shape[0]
        if rows is not None and rows % n:
            raise ValueError(
                f"alltoall without splits sends axis 0 in {n} equal parts, but it has {rows} rows; "
                "pass splits= (rows for each rank) or pad the tensor"
            )
        return tf.fill([n], tf.shape(x, out_type=tf.int64)[0] // n)
    return tf.cast(tf.convert_to_tensor(splits), tf.int64)


def _alltoall(x, counts):
    def host(t, c):
        c = [int(v) for v in c.numpy()]
        if len(c) != size() or any(v < 0 for v in c) or sum(c) != t.shape[0]:
            raise ValueError(f"alltoall splits {c} must be {size()} non-negative row counts summing to axis 0 "
                             f"({t.shape[0]})")
        out, received = bridge.alltoall(t, c)
        return [out, tf.constant(received, dtype=tf.int32)]

    shape = tf.TensorShape([None]).concatenate(x.shape[1:])
    return bridge.host_call(host, [x, counts], [x.dtype, tf.int32], [shape, [size()]])


@_no_autograph
def alltoall(tensor, splits=None, name=None, ignore_name_scope=False, process_set=global_process_set):
    """Send splits[j] rows of axis 0 to rank j (equal parts without splits); differentiable.

    Returns:
        The rows received from every rank in rank order; with `splits` given, (rows,
        received_splits) as in Horovod (received_splits is int32).

    Raises:
        ValueError: splits do not sum to axis 0, or axis 0 does not divide by size() without them.
    """
    _check_process_set(process_set)
    x = tf.convert_to_tensor(tensor)
    if x.shape.rank == 0:
        raise ValueError("alltoall needs a tensor with at least one axis; use tf.reshape(t, [1])")
    counts = _alltoall_counts(x, splits)
    received = []

    def run(x):
        out, got = _alltoall(x, counts)
        received.append(got)
        return out

    # Horovod's gradient: each block of the gradient goes back where its rows came from.
    out = _differentiable(run, lambda dy: _alltoall(dy, received[0])[0], x)
    return (out, received[0]) if splits is not None else out


def _reducescatter(x, op: str, pre: float, post: float):
    def run(x):
        shape = tf.TensorShape([None]).concatenate(x.shape[1:])
        return bridge.host_call(lambda t: [bridge.reduce_scatter(t, op, pre, post)], [x], [x.dtype], [shape])[0]

    def grad(dy):
        if op not in ("sum", "average"):
            raise NotImplementedError(f"reducescatter has a gradient for Sum and Average only, not {op}")
        # Horovod's definition: gather the gradient blocks back, times size() for Sum and
        # times the scale factors.
        scale = pre * post * (size() if op == "sum" else 1)
        return allgather(dy * scale if scale != 1 else dy)

    return _differentiable(run, grad, x)


@_no_autograph
def reducescatter(tensor, device_dense="", compression=Compression.none, op=Average, name=None,
                  process_set=global_process_set, ignore_name_scope=False, prescale_factor=1.0,
                  postscale_factor=1.0):
    """Return this rank's block of rows of the reduction of `tensor` over all ranks (Average by
    default); differentiable. With R rows on n ranks the first R % n ranks get one row more."""
    _check_process_set(process_set)
    op_name = reduce_op_name(op)
    x = tf.convert_to_tensor(tensor)
    if x.shape.rank == 0:
        raise ValueError("reducescatter needs a tensor with at least one axis")
    _check_scale(x, prescale_factor, postscale_factor)
    compression = Compression.none if compression is None else compression
    wire, ctx = compression.compress(x)
    return compression.decompress(_reducescatter(wire, op_name, prescale_factor, postscale_factor), ctx)


@_no_autograph
def join(device=""):
    """Declare that this rank has no more data; serve the others' allreduces until all join.

    Returns:
        The rank that joined last, as an int32 scalar tensor (as Horovod's TF join).
    """
    return bridge.host_call(lambda: [tf.constant(bridge.join(), tf.int32)], [], [tf.int32], [[]])[0]


@_no_autograph
def barrier(process_set=global_process_set) -> None:
    """Wait until every rank has called barrier (a rank that never comes is named)."""
    _check_process_set(process_set)

    def host():
        bridge.barrier()
        return []

    bridge.host_call(host, [], [])
