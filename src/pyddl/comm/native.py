"""The `native` allreduce: the backend's own allreduce over the communicator's group (a flat
ring in Gloo and NCCL)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["allreduce_"]

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "average": dist.ReduceOp.SUM,  # divided below: Gloo has no AVG
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
    "product": dist.ReduceOp.PRODUCT,
}


def allreduce_(comm, flat: torch.Tensor, op: str, seq: int, fill=None) -> None:
    """Reduce the contiguous 1-D `flat` in place over `comm` (integer averages floor)."""
    if fill is not None:
        fill(0, flat.numel())
    dist.all_reduce(flat, op=_OPS[op], group=comm.group)
    if op == "average":
        if flat.is_floating_point():
            flat.div_(comm.size)
        else:
            flat.floor_divide_(comm.size)
