"""The framework-neutral collectives: allreduce (three algorithms), broadcast, allgather,
reduce_scatter, barrier — on the world group, through the engine and its guards.

Out-of-place calls snapshot their input at call time, so an async call's input may be
reused at once; in-place calls (trailing underscore) write into the tensor given.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from pyddl import runtime
from pyddl.comm.codecs import get_codec
from pyddl.comm.engine import Handle
from pyddl.comm.fusion import DEFAULT_BUCKET_BYTES, pack, plan_buckets, unpack
from pyddl.comm.guard import OpInfo, exchange
from pyddl.errors import PyddlError
from pyddl.comm.multiring import multiring_allreduce_
from pyddl.comm.ring import equal_parts, ring_reduce_scatter_

__all__ = [
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "grouped_allreduce_",
    "grouped_allreduce_async_",
    "broadcast",
    "broadcast_",
    "broadcast_async_",
    "allgather",
    "allgather_async",
    "reduce_scatter",
    "reduce_scatter_async",
    "barrier",
    "join",
    "set_check",
    "reduce_buffer_",
    "check_op",
    "check_algorithm",
    "REDUCE_OPS",
    "DTYPES",
]

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
_NATIVE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "average": dist.ReduceOp.SUM,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
    "product": dist.ReduceOp.PRODUCT,
}


def _check_tensor(tensor, what: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TypeError(f"{what} has dtype {tensor.dtype}; pyddl collectives support {names}")


def check_op(op: str) -> str:
    name = str(op).lower()
    if name not in REDUCE_OPS:
        raise ValueError(f"unknown reduction op {op!r}; choose one of {', '.join(REDUCE_OPS)}")
    return name


def check_algorithm(algorithm: str | None) -> str:
    """Validate an algorithm name (None: the job's default); "auto" is tuned here if not yet.

    Call it on the thread that issues the collective, before submitting it: tuning is itself
    a series of collectives, which must take their place in the same order on every rank.
    Tuning lazily on the engine thread instead, while other threads keep submitting buckets,
    numbered its collectives differently on each rank, and the job hung.
    """
    alg = (algorithm or runtime.settings().allreduce).lower()
    if alg not in runtime.ALGORITHMS:
        raise ValueError(f"unknown allreduce algorithm {algorithm!r}; choose one of {', '.join(runtime.ALGORITHMS)}")
    if alg == "auto":
        runtime.ensure_tuned()
    return alg


def _describe(tensor: torch.Tensor, shape=None) -> str:
    dims = ",".join(map(str, tensor.shape if shape is None else shape))
    return f"{str(tensor.dtype).replace('torch.', '')}[{dims}]"


def _reduce_flat_(flat: torch.Tensor, op: str, algorithm: str, seq: int) -> None:
    """Allreduce a contiguous 1-D tensor in place with the chosen algorithm (engine thread)."""
    st = runtime._get()
    if flat.numel() == 0 or dist.get_world_size() == 1:
        return  # nothing to move; one rank's sum, min, max or average is its own tensor
    if algorithm == "auto":
        algorithm = st.tuned.pick(flat.numel() * flat.element_size())  # tuned by check_algorithm
    if algorithm == "native":
        dist.all_reduce(flat, op=_NATIVE_OPS[op], group=st.world)
        if op == "average":
            if flat.is_floating_point():
                flat.div_(dist.get_world_size())
            else:
                flat.floor_divide_(dist.get_world_size())
    else:
        multiring_allreduce_(
            flat, op, st.levels, st.settings.chunk_bytes, seq, pipeline=st.backend != "nccl"
        )


def reduce_buffer_(work: torch.Tensor, op: str, algorithm: str, codec, seq: int) -> None:
    """Allreduce `work` (contiguous, on the collective device) in place, through `codec`.

    For adapters that pack their own buffers: call it only inside a `run_collective` job
    (it is collective #seq); `op` and `algorithm` must already be validated names.
    """
    flat = work.view(-1)
    if codec.applies_to(flat):
        world = dist.get_world_size()
        wire = codec.encode(flat, op, world)
        # The wire carries pre-divided values, so a sum of it is already an average.
        _reduce_flat_(wire, "sum" if op == "average" else op, algorithm, seq)
        codec.decode_(wire, flat, op, world)
    else:
        _reduce_flat_(flat, op, algorithm, seq)


def _to_work(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    device = runtime.device()
    if copy or not tensor.is_contiguous() or tensor.device != device:
        return tensor.detach().to(device, copy=True, memory_format=torch.contiguous_format)
    return tensor.detach()


def _allreduce(tensor, op, algorithm, compression, inplace: bool, asynchronous: bool):
    _check_tensor(tensor)
    op, alg, codec = check_op(op), check_algorithm(algorithm), get_codec(compression)
    work = _to_work(tensor, copy=not inplace)
    info = OpInfo(
        "allreduce",
        f"{_describe(tensor)} op={op} algorithm={alg} compression={codec.name}",
        join_spec=(((work.numel(), str(work.dtype)),), op, alg, codec.name),
    )

    def fn(seq: int) -> torch.Tensor:
        reduce_buffer_(work, op, alg, codec, seq)
        if not inplace:
            return work.to(tensor.device) if work.device != tensor.device else work
        if work.data_ptr() != tensor.data_ptr():
            tensor.copy_(work)
        return tensor

    return runtime.run_collective(info, fn, asynchronous)


def allreduce(tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None, compression=None) -> torch.Tensor:
    """Reduce `tensor` across all ranks and return the result as a new tensor.

    Args:
        tensor: any shape; float32/float64/float16/bfloat16/int32/int64 (also int8/uint8).
        op: "sum", "average", "min", "max" or "product". Average of integers floors.
        algorithm: "native", "multiring" or "auto"; default: the job's setting.
        compression: "none", "fp16" or "bf16" wire codec for floating-point tensors.

    Returns:
        A tensor of the same shape, dtype and device holding the reduction.

    Raises:
        CollectiveMismatchError: ranks passed different shapes, dtypes or options.
        CollectiveTimeoutError: a rank did not arrive within the timeout (it is named).

    Example:
        >>> pyddl.allreduce(torch.tensor([pyddl.rank() + 1]))  # n(n+1)/2 on every rank
    """
    return _allreduce(tensor, op, algorithm, compression, inplace=False, asynchronous=False)


def allreduce_(tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None, compression=None) -> torch.Tensor:
    """Reduce `tensor` across all ranks in place and return it (see `allreduce`)."""
    return _allreduce(tensor, op, algorithm, compression, inplace=True, asynchronous=False)


def allreduce_async(tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None, compression=None) -> Handle:
    """Start `allreduce` in the background; `handle.wait()` returns the new tensor."""
    return _allreduce(tensor, op, algorithm, compression, inplace=False, asynchronous=True)


def allreduce_async_(tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None, compression=None) -> Handle:
    """Start an in-place allreduce in the background; `handle.wait()` returns `tensor`."""
    return _allreduce(tensor, op, algorithm, compression, inplace=True, asynchronous=True)


def _grouped(tensors: Sequence[torch.Tensor], op, algorithm, compression, bucket_bytes, asynchronous):
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        _check_tensor(t, f"tensors[{i}]")
    op, alg, codec = check_op(op), check_algorithm(algorithm), get_codec(compression)
    buckets = plan_buckets([(t.numel(), str(t.dtype), t.element_size()) for t in tensors], bucket_bytes)
    shapes = ";".join(_describe(t) for t in tensors)
    flats = tuple((sum(tensors[i].numel() for i in b), str(tensors[b[0]].dtype)) for b in buckets)
    info = OpInfo(
        "grouped_allreduce",
        f"[{shapes}] op={op} algorithm={alg} compression={codec.name}",
        join_spec=(flats, op, alg, codec.name),
    )
    device = runtime.device()

    def fn(seq: int) -> list[torch.Tensor]:
        for bucket in buckets:
            members = [tensors[i] for i in bucket]
            flat = pack([m.detach().to(device) for m in members])
            reduce_buffer_(flat, op, alg, codec, seq)
            unpack(flat, [m.detach() for m in members])
        return tensors

    return runtime.run_collective(info, fn, asynchronous)


def grouped_allreduce_(
    tensors: Sequence[torch.Tensor],
    op: str = "sum",
    algorithm: str | None = None,
    compression=None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> list[torch.Tensor]:
    """Allreduce many tensors in place, fused into flat buckets of at most `bucket_bytes`.

    One collective per bucket instead of one per tensor: the latency is paid per bucket.
    """
    return _grouped(tensors, op, algorithm, compression, bucket_bytes, asynchronous=False)


def grouped_allreduce_async_(
    tensors: Sequence[torch.Tensor],
    op: str = "sum",
    algorithm: str | None = None,
    compression=None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Handle:
    """Start `grouped_allreduce_` in the background; `handle.wait()` returns the tensors."""
    return _grouped(tensors, op, algorithm, compression, bucket_bytes, asynchronous=True)


def _check_root(root: int) -> int:
    n = dist.get_world_size()
    if not isinstance(root, int) or not 0 <= root < n:
        raise ValueError(f"broadcast root {root!r} is out of range: this job has ranks 0..{n - 1}")
    return root


def _broadcast(tensor: torch.Tensor, root: int, inplace: bool, asynchronous: bool):
    runtime._get()
    _check_tensor(tensor)
    root = _check_root(root)
    work = _to_work(tensor, copy=not inplace)
    info = OpInfo("broadcast", f"{_describe(tensor)} root={root}")

    def fn(seq: int) -> torch.Tensor:
        if work.numel():
            dist.broadcast(work, src=root, group=runtime._get().world)
        if not inplace:
            return work.to(tensor.device)
        if work.data_ptr() != tensor.data_ptr():
            tensor.copy_(work)
        return tensor

    return runtime.run_collective(info, fn, asynchronous)


def broadcast(tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Return a new tensor holding rank `root`'s `tensor` on every rank.

    Raises:
        ValueError: `root` is not a rank of this job.
    """
    return _broadcast(tensor, root, inplace=False, asynchronous=False)


def broadcast_(tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `root`'s; return it."""
    return _broadcast(tensor, root, inplace=True, asynchronous=False)


def broadcast_async_(tensor: torch.Tensor, root: int = 0) -> Handle:
    """Start `broadcast_` in the background; `handle.wait()` returns `tensor`."""
    return _broadcast(tensor, root, inplace=True, asynchronous=True)


def _allgather(tensor: torch.Tensor, asynchronous: bool):
    runtime._get()
    _check_tensor(tensor)
    if tensor.dim() == 0:
        raise ValueError("allgather needs a tensor with at least one axis; use tensor.reshape(1)")
    work = _to_work(tensor, copy=True)
    rest = tuple(tensor.shape[1:])
    info = OpInfo("allgather", _describe(tensor, ("*",) + rest))

    def fn(seq: int) -> torch.Tensor:
        world, n = runtime._get().world, dist.get_world_size()
        counts = [torch.zeros(1, dtype=torch.int64, device=work.device) for _ in range(n)]
        dist.all_gather(counts, torch.tensor([work.shape[0]], dtype=torch.int64, device=work.device), group=world)
        rows = [int(c) for c in counts]
        longest = max(rows)
        padded = work
        if work.shape[0] < longest:
            padded = torch.zeros((longest,) + rest, dtype=work.dtype, device=work.device)
            padded[: work.shape[0]] = work
        if longest == 0 or padded.numel() == 0:
            return torch.empty((sum(rows),) + rest, dtype=tensor.dtype, device=tensor.device)
        gathered = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(gathered, padded, group=world)
        out = torch.cat([g[:r] for g, r in zip(gathered, rows)])
        return out.to(tensor.device)

    return runtime.run_collective(info, fn, asynchronous)


def allgather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along axis 0, in rank order.

    The first axis may differ across ranks; the other axes and the dtype must match.
    """
    return _allgather(tensor, asynchronous=False)


def allgather_async(tensor: torch.Tensor) -> Handle:
    """Start `allgather` in the background; `handle.wait()` returns the result."""
    return _allgather(tensor, asynchronous=True)


def reduce_scatter(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` across ranks and return this rank's block of rows of the result.

    Axis 0 is split like `torch.tensor_split(tensor, size())`: with R rows on n ranks, the
    first R % n ranks get one row more.
    """
    return _reduce_scatter(tensor, op, asynchronous=False)


def reduce_scatter_async(tensor: torch.Tensor, op: str = "sum") -> Handle:
    """Start `reduce_scatter` in the background; `handle.wait()` returns this rank's rows."""
    return _reduce_scatter(tensor, op, asynchronous=True)


def _reduce_scatter(tensor: torch.Tensor, op: str, asynchronous: bool):
    runtime._get()
    _check_tensor(tensor)
    if tensor.dim() == 0:
        raise ValueError("reduce_scatter needs a tensor with at least one axis")
    op = check_op(op)
    work = _to_work(tensor, copy=True)
    info = OpInfo("reduce_scatter", f"{_describe(tensor)} op={op}")

    def fn(seq: int) -> torch.Tensor:
        n, me = dist.get_world_size(), dist.get_rank()
        row = tensor[0].numel() if tensor.shape[0] else 0
        rows = [length for _, length in equal_parts(0, tensor.shape[0], n)]
        parts, offset = [], 0
        for r in rows:
            parts.append((offset, r * row))
            offset += r * row
        flat = work.view(-1)
        ring_reduce_scatter_(flat, parts, list(range(n)), me, runtime._get().world, op, (seq % 4096) << 18)
        start, length = parts[me]
        mine = flat[start : start + length].view((rows[me],) + tuple(tensor.shape[1:]))
        if op == "average":
            mine = mine / n if mine.is_floating_point() else mine.floor_divide(n)
        return mine.clone().to(tensor.device)

    return runtime.run_collective(info, fn, asynchronous)


def barrier() -> None:
    """Wait until every rank has called barrier (names the missing ranks on timeout)."""
    runtime._get()
    info = OpInfo("barrier", "")
    runtime.run_collective(info, lambda seq: dist.barrier(group=runtime._get().world))


def set_check(enabled: bool) -> None:
    """Turn the cross-rank check before every collective on or off, on every rank at once.

    The check costs a small allgather per collective (on the emulated 1 Gbit/s bed, 15-18 ms
    of a 1.3 s ResNet-18 step with 17 gradient buckets: docs/emulation.md). A script whose
    collectives have proven to match (say, after its first steps) can turn it off. Without
    it, mismatched calls across ranks are no longer a CollectiveMismatchError: they may fail
    in the backend, time out or, with equal sizes, return a wrong result; and join() is not
    available. Every rank must call it at the same point: it is itself a collective, always
    checked, so a rank that asks for the other setting gets a CollectiveMismatchError on every
    rank. It takes effect from the next collective on every rank alike. `PYDDL_CHECK=0` sets
    the job's start value.
    """
    st = runtime._get()
    enabled = bool(enabled)
    info = OpInfo("set_check", f"enabled={enabled}")
    ranks = list(range(dist.get_world_size()))

    def fn(seq: int) -> None:
        # On the engine thread, between two collectives: every rank switches at the same one.
        if len(ranks) > 1:
            exchange(info, seq, st.world, ranks, st.device, dist.get_rank())
        st.settings = dataclasses.replace(st.settings, check=enabled)

    runtime.run_collective(info, fn, checked=False)


def _identity(op: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The element that leaves a reduction unchanged: what a joined rank contributes."""
    device = runtime.device()
    if op in ("sum", "average"):
        return torch.zeros(numel, dtype=dtype, device=device)
    if op == "product":
        return torch.ones(numel, dtype=dtype, device=device)
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    fill = (float("inf") if op == "min" else float("-inf")) if dtype.is_floating_point else (info.max if op == "min" else info.min)
    return torch.full((numel,), fill, dtype=dtype, device=device)


def join() -> int:
    """Declare that this rank has no more data; serve the others' allreduces until all join.

    While this rank waits, every allreduce-type collective the other ranks run (allreduce,
    grouped allreduce, gradient buckets) gets this rank's identity element (zeros for a sum,
    so an average still divides by the full size, as in Horovod). Other collectives raise a
    clear error on every rank. Uneven data (a rank with fewer batches) then ends without a hang.

    Returns:
        The rank that joined last.
    """
    st = runtime._get()
    if dist.get_world_size() == 1:
        return 0
    if not st.settings.check:
        raise PyddlError("join() needs the per-collective exchange, which PYDDL_CHECK=0 turned off")
    me, ranks = dist.get_rank(), list(range(dist.get_world_size()))

    def fn(seq: int):
        while True:
            rnd = exchange(None, seq, st.world, ranks, st.device, me)
            if rnd.all_joined:
                return rnd
            (buffers, op, alg, codec), op_seq = rnd.serve
            if alg == "auto":
                if st.tuned is None:
                    raise PyddlError("an auto allreduce ran while ranks were joined before auto was tuned; "
                                     "start the job with allreduce='auto' so every rank tunes at init")
                alg = None
            for numel, dtype_name in buffers:
                buf = _identity(op, getattr(torch, dtype_name.replace("torch.", "")), numel)
                chosen = alg or st.tuned.pick(buf.numel() * buf.element_size())
                reduce_buffer_(buf, op, chosen, get_codec(codec), op_seq)

    rnd = runtime.run_collective(OpInfo("join", ""), fn, checked=False)
    runtime.resync_seq(rnd.max_seq)
    return rnd.last_joined
