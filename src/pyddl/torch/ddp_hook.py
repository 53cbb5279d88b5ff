"""DDP communication hooks: torch's DistributedDataParallel with pyddl's allreduce.

    model = DistributedDataParallel(model)
    model.register_comm_hook(None, pyddl.torch.allreduce_hook)          # or a HookState
    model.register_comm_hook(HookState(algorithm="multiring"), pyddl.torch.fp16_allreduce_hook)

DDP keeps its own bucketing and overlap; pyddl reduces each bucket (averaged over ranks) with
the job's algorithm, through the same engine and guards as every other collective. (No `from __future__ import annotations`
here: DDP checks the hooks' return annotation object.)
"""

from dataclasses import dataclass

import torch

import pyddl
from pyddl.comm.codecs import get_codec
from pyddl.comm.guard import OpInfo

__all__ = ["HookState", "allreduce_hook", "fp16_allreduce_hook", "bf16_allreduce_hook", "noop_hook"]


@dataclass(frozen=True)
class HookState:
    """Options of pyddl's DDP hooks (pass None for the job's defaults)."""

    algorithm: str | None = None


def _hook(state, bucket, codec_name: str | None) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    comm = pyddl.world()
    future: torch.futures.Future = torch.futures.Future()

    def done(result, error) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    if buffer.is_sparse:  # a sparse gradient's bucket: its rows allgathered and averaged, uncompressed
        comm.sparse_allreduce_async(buffer, op="average", inplace=True).add_done_callback(done)
        return future
    algorithm = comm.check_algorithm(getattr(state, "algorithm", None))
    codec = get_codec(codec_name)
    info = OpInfo(
        "ddp_bucket",
        f"#{bucket.index()} {buffer.dtype}[{buffer.numel()}] codec={codec.name}",
        join_spec=(((buffer.numel(), str(buffer.dtype)),), "average", algorithm, codec.name),
    )

    def fn(seq: int) -> torch.Tensor:
        comm.reduce_buffer_(buffer, "average", algorithm, codec, seq)
        return buffer

    comm.run(info, fn, asynchronous=True).add_done_callback(done)
    return future


def allreduce_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP gradient bucket over all ranks with pyddl's allreduce."""
    return _hook(state, bucket, None)


def fp16_allreduce_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """As `allreduce_hook`, sending fp16 on the wire (pre-divided, so no overflow)."""
    return _hook(state, bucket, "fp16")


def bf16_allreduce_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """As `allreduce_hook`, sending bfloat16 on the wire."""
    return _hook(state, bucket, "bf16")


def noop_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """Skip communication entirely: for measuring the compute-only step time (benchmarks)."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future
