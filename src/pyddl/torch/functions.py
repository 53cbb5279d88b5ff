"""Horovod's state helpers: broadcast parameters, optimizer state and Python objects.

Objects travel pickled (torch.distributed's object collectives); only use them between ranks of
one job you trust, as with any pickle.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pyddl import runtime
from pyddl.comm.guard import OpInfo
from pyddl.torch.ops import broadcast_async_, rank, size, synchronize

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object"]


def broadcast_parameters(params, root_rank: int, prefix: str | None = None) -> None:
    """Overwrite every rank's parameters (a state_dict or (name, tensor) pairs) with root's.

    Example:
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type {type(params).__name__}: pass model.state_dict() or model.named_parameters() as a list")
    handles = []
    for name, p in items:
        if not isinstance(p, torch.Tensor):
            continue
        full = f"{prefix}.{name}" if prefix and name else name
        with torch.no_grad():
            handles.append(broadcast_async_(p.data if p.requires_grad else p, root_rank, name=None if full is None else f"broadcast.{full}"))
    for h in handles:
        synchronize(h)


def broadcast_optimizer_state(optimizer, root_rank: int, prefix: str | None = None, model=None) -> None:
    """Give every rank root's optimizer state (hyperparameters, learning rates, momentum...).

    Works before the first step too (the state is then just the hyperparameters).
    """
    state = broadcast_object(optimizer.state_dict() if rank() == root_rank else None, root_rank)
    if rank() != root_rank:
        optimizer.load_state_dict(state)


def broadcast_object(obj, root_rank: int = 0, name: str | None = None, process_set=None):
    """Return rank `root_rank`'s `obj` (any picklable object) on every rank."""
    if process_set is not None:
        raise ValueError("pyddl runs every collective on all ranks: process_set= must be left unset")
    if not isinstance(root_rank, int) or not 0 <= root_rank < size():
        raise ValueError(f"broadcast root_rank {root_rank!r} is out of range: this job has ranks 0..{size() - 1}")

    def fn(seq):
        holder = [obj]
        dist.broadcast_object_list(holder, src=root_rank, group=runtime.world_group())
        return holder[0]

    return runtime.run_collective(OpInfo("broadcast_object", f"root={root_rank}"), fn)


def allgather_object(obj, name: str | None = None, process_set=None) -> list:
    """Return the list of every rank's `obj`, in rank order."""
    if process_set is not None:
        raise ValueError("pyddl runs every collective on all ranks: process_set= must be left unset")

    def fn(seq):
        out: list = [None] * size()
        dist.all_gather_object(out, obj, group=runtime.world_group())
        return out

    return runtime.run_collective(OpInfo("allgather_object", ""), fn)
