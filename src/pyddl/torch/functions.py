"""Horovod's state helpers: broadcast parameters, optimizer state and Python objects.

Objects travel pickled (torch.distributed's object collectives, plain pickle where Horovod
uses cloudpickle); only exchange them between ranks of one job you trust, as with any pickle.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.distributed as dist

import pyddl
from pyddl.comm.guard import OpInfo
from pyddl.torch.ops import (
    _check_root, _comm_of, broadcast_async_, global_process_set, horovod_errors, rank, synchronize,
)

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object"]


def broadcast_parameters(params, root_rank: int) -> None:
    """Overwrite every rank's tensors with rank `root_rank`'s, in place.

    Args:
        params: `model.state_dict()` (broadcast in sorted key order), or a list of
            `model.named_parameters()` pairs or of bare tensors (a generator works too).
        root_rank: the rank whose values every rank ends with.

    Raises:
        ValueError: `params` is of another type, or `root_rank` is out of range.
        HorovodInternalError: ranks passed different shapes or dtypes.

    Example:
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, (list, tuple)) or inspect.isgenerator(params):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(
            f"broadcast_parameters takes model.state_dict() or a list of (name, tensor) pairs or tensors, "
            f"got {type(params).__name__}"
        )
    # Non-tensor entries (a module's extra state) are left alone, as they cannot be broadcast.
    handles = [broadcast_async_(p, root_rank, name) for name, p in items if isinstance(p, torch.Tensor)]
    for handle in handles:
        synchronize(handle)


class _Slot(NamedTuple):
    """Where one tensor of the root's optimizer state travels: its flat buffer and offset."""

    group: tuple  # (dtype, on_cpu): one flat buffer per group
    offset: int
    shape: tuple


def _strip(obj, tensors: list, sizes: dict):
    """Return `obj` (nested dicts/lists/tuples) with each tensor replaced by its _Slot."""
    if isinstance(obj, torch.Tensor):
        group = (obj.dtype, obj.device.type == "cpu")
        offset = sizes.get(group, 0)
        sizes[group] = offset + obj.numel()
        tensors.append(obj)
        return _Slot(group, offset, tuple(obj.shape))
    if isinstance(obj, dict):
        return {k: _strip(v, tensors, sizes) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v, tensors, sizes) for v in obj]
    if type(obj) is tuple:
        return tuple(_strip(v, tensors, sizes) for v in obj)
    return obj


def _fill(obj, flats: dict):
    """Return the skeleton with each _Slot replaced by its part of the received buffers."""
    if isinstance(obj, _Slot):
        numel = 1
        for d in obj.shape:
            numel *= d
        return flats[obj.group].narrow(0, obj.offset, numel).view(obj.shape)
    if isinstance(obj, dict):
        return {k: _fill(v, flats) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, flats) for v in obj]
    if type(obj) is tuple:
        return tuple(_fill(v, flats) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer, root_rank: int) -> None:
    """Give every rank the optimizer state of rank `root_rank`.

    That is the per-parameter state (momentum buffers, Adam moments, step counts), the
    hyperparameters and the learning rate of every parameter group. It works before the first
    step too, when the state holds only hyperparameters: then, as in Horovod, every parameter
    that trains and has no gradient yet gets a zero one; unlike Horovod it never steps the
    optimizer to create state, and it handles any optimizer (LBFGS too). The structure travels
    pickled, the tensors as one broadcast per dtype.

    Args:
        optimizer: a torch optimizer or a DistributedOptimizer, over the same model on every rank.
        root_rank: the rank whose state every rank ends with.

    Raises:
        ValueError: `root_rank` is out of range, or the optimizers hold different parameters.
        HorovodInternalError: a collective failed (a rank missing, say).

    Example:
        >>> hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    """
    root = _check_root(root_rank)
    if not optimizer.state_dict()["state"]:
        # As Horovod: before the first step, parameters that train get zero gradients (Horovod
        # then steps the optimizer with them to create its state; pyddl does not step).
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
    tensors: list = []
    sizes: dict = {}
    skeleton = _strip(optimizer.state_dict(), tensors, sizes) if rank() == root else None
    skeleton, sizes = broadcast_object((skeleton, sizes), root)
    device = pyddl.device()
    handles = {}
    for group, numel in sizes.items():
        dtype, on_cpu = group
        where = torch.device("cpu") if on_cpu else device
        if rank() == root:
            members = [t.detach().reshape(-1).to(where) for t in tensors if (t.dtype, t.device.type == "cpu") == group]
            flat = torch.cat(members)
        else:
            flat = torch.empty(numel, dtype=dtype, device=where)
        handles[group] = broadcast_async_(flat, root)
    flats = {group: synchronize(h) for group, h in handles.items()}
    if rank() != root:
        optimizer.load_state_dict(_fill(skeleton, flats))


def broadcast_object(obj, root_rank: int = 0, name: str | None = None, process_set=global_process_set):
    """Return rank `root_rank`'s `obj` (any picklable object) on every rank.

    Args:
        obj: the object on the root; ignored on the other ranks.
        root_rank: the rank that sends.
        name: accepted for Horovod compatibility (a synchronous call cannot collide).
        process_set: the ranks taking part (hvd.add_process_set); default: every rank.

    Raises:
        ValueError: `root_rank` is out of range or not in the process set.
        HorovodInternalError: a collective failed (a rank missing, say).
    """
    comm = _comm_of(process_set)
    root = _check_root(root_rank, comm)

    def fn(seq: int):
        holder = [obj]
        dist.broadcast_object_list(holder, src=comm.ranks[root], group=comm.group)
        return holder[0]

    with horovod_errors():
        return comm.run(OpInfo("broadcast_object", f"root={root}"), fn)


def allgather_object(obj, name: str | None = None, process_set=global_process_set) -> list:
    """Return the list of every rank's `obj` (picklable), in rank order.

    Args:
        obj: this rank's object.
        name: accepted for Horovod compatibility (a synchronous call cannot collide).
        process_set: the ranks taking part (hvd.add_process_set); default: every rank.
    """
    comm = _comm_of(process_set)

    def fn(seq: int):
        out: list = [None] * comm.size
        dist.all_gather_object(out, obj, group=comm.group)
        return out

    with horovod_errors():
        return comm.run(OpInfo("allgather_object", ""), fn)
