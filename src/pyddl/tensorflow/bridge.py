"""The one module of pyddl.tensorflow that calls pyddl's core: TF tensors cross to torch by
DLPack (no copy for a CPU tensor) and back, and each collective runs as a host callback.

In eager mode a collective runs at the call. Inside `tf.function` it is a `tf.py_function`
op: TF runs the traced graph and calls back into Python, which runs the collective on pyddl's
engine thread. py_function ops are stateful, so TF keeps them in program order and every rank
issues its collectives in the same order. A graph holding one cannot be saved or run without
Python (as with any py_function).
"""

from __future__ import annotations

import pickle

import tensorflow as tf
import torch

import pyddl
from pyddl.torch.ops import horovod_errors, init  # init: Horovod's (comm=, process_sets=) on pyddl.init

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "host_call", "to_torch", "to_tf", "allreduce", "grouped_allreduce", "broadcast", "allgather",
    "reduce_scatter", "alltoall", "barrier", "join", "broadcast_object", "allgather_object", "DTYPES",
]

shutdown, is_initialized = pyddl.shutdown, pyddl.is_initialized
size, rank, local_size, local_rank = pyddl.size, pyddl.rank, pyddl.local_size, pyddl.local_rank
cross_size, cross_rank = pyddl.cross_size, pyddl.cross_rank

def _comm():
    """The communicator every collective of pyddl.tensorflow runs on: the job's world."""
    return pyddl.world()


DTYPES = (tf.float32, tf.float64, tf.float16, tf.bfloat16, tf.int32, tf.int64, tf.int8, tf.uint8)


def _check_dtype(tensor, what: str = "tensor") -> None:
    if tensor.dtype not in DTYPES:
        names = ", ".join(d.name for d in DTYPES)
        raise TypeError(f"{what} has dtype {tensor.dtype.name}; pyddl collectives support {names}")


def to_torch(tensor: tf.Tensor) -> torch.Tensor:
    """A torch view of an eager TF tensor's buffer (DLPack; TF copies only a GPU tensor's
    layout it cannot share). Treat it as read-only: TF tensors are immutable."""
    _check_dtype(tensor)
    return torch.from_dlpack(tf.experimental.dlpack.to_dlpack(tensor))


def to_tf(tensor: torch.Tensor) -> tf.Tensor:
    """An eager TF tensor over a torch tensor's buffer (DLPack, no copy when contiguous)."""
    return tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(tensor.contiguous()))


def host_call(fn, inputs: list, tout: list, shapes: list | None = None) -> list:
    """Run fn(*eager_tensors) -> list of tensors now (eager) or as a py_function (in a graph).

    Args:
        fn: takes and returns eager tensors.
        inputs: tensors (or variables) passed to fn.
        tout: the dtypes fn returns.
        shapes: the static shapes to give the graph outputs (None: unknown).
    """
    inputs = [tf.convert_to_tensor(t) for t in inputs]
    if tf.executing_eagerly():
        return list(fn(*inputs))
    outs = tf.py_function(fn, inputs, tout)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for out, shape in zip(outs, shapes or [None] * len(outs)):
        if shape is not None:
            out.set_shape(shape)
    return outs


def _scaled(tensor: tf.Tensor, factor: float) -> torch.Tensor:
    """A fresh torch tensor holding tensor * factor (the core then reduces it in place)."""
    x = to_torch(tensor)
    return x * factor if factor != 1.0 else x.clone()


def allreduce(tensor: tf.Tensor, op: str, codec: str | None, pre: float, post: float) -> tf.Tensor:
    """The allreduce of an eager tensor; op is a core name ("sum", "average", ...)."""
    with horovod_errors():
        out = _comm().allreduce_(_scaled(tensor, pre), op=op, compression=codec)
    if post != 1.0:
        out.mul_(post)
    return to_tf(out)


def grouped_allreduce(tensors: list, op: str, codec: str | None, pre: float, post: float) -> list:
    """One fused allreduce of eager tensors (buckets of the core's grouped allreduce)."""
    work = [_scaled(t, pre) for t in tensors]
    with horovod_errors():
        _comm().grouped_allreduce_(work, op=op, compression=codec)
    if post != 1.0:
        for w in work:
            w.mul_(post)
    return [to_tf(w) for w in work]


def broadcast(tensor: tf.Tensor, root: int) -> tf.Tensor:
    with horovod_errors():
        return to_tf(_comm().broadcast(to_torch(tensor), root=root))


def allgather(tensor: tf.Tensor) -> tf.Tensor:
    with horovod_errors():
        return to_tf(_comm().allgather(to_torch(tensor)))


def reduce_scatter(tensor: tf.Tensor, op: str, pre: float, post: float) -> tf.Tensor:
    with horovod_errors():
        out = _comm().reduce_scatter(_scaled(tensor, pre), op=op)
    if post != 1.0:
        out.mul_(post)
    return to_tf(out)


def alltoall(tensor: tf.Tensor, splits: list[int]) -> tuple[tf.Tensor, list[int]]:
    """Send splits[j] rows of axis 0 to rank j; return the rows received, in rank order, and
    how many came from each rank."""
    with horovod_errors():
        rows, received = _comm().alltoall(to_torch(tensor), splits)
    return to_tf(rows), received


def barrier() -> None:
    with horovod_errors():
        _comm().barrier()


def join() -> int:
    with horovod_errors():
        return _comm().join()


def broadcast_object(obj, root: int):
    """Rank `root`'s picklable object on every rank (a length, then the bytes, broadcast)."""
    data = pickle.dumps(obj) if rank() == root else b""
    with horovod_errors():
        length = int(_comm().broadcast(torch.tensor([len(data)], dtype=torch.int64), root=root))
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(length, dtype=torch.uint8)
        buf = _comm().broadcast(buf, root=root)
    return pickle.loads(buf.numpy().tobytes()) if rank() != root else obj


def allgather_object(obj) -> list:
    """Every rank's picklable object, in rank order (lengths, then the bytes, allgathered)."""
    data = pickle.dumps(obj)
    with horovod_errors():
        lengths = _comm().allgather(torch.tensor([len(data)], dtype=torch.int64)).tolist()
        flat = _comm().allgather(torch.frombuffer(bytearray(data), dtype=torch.uint8)).numpy()
    out, offset = [], 0
    for length in lengths:
        out.append(pickle.loads(flat[offset : offset + length].tobytes()))
        offset += length
    return out

