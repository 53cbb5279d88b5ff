"""pyddl's module-level functions: the world communicator's methods and properties, for
scripts that use one communicator (`pyddl.allreduce(t)` is `pyddl.world().allreduce(t)`).

Each collective here is the Communicator method of the same name, with its signature and
docstring; the rank queries read the world communicator's properties.
"""

from __future__ import annotations

import functools
import inspect

import torch

from pyddl.comm.communicator import Communicator
from pyddl.runtime import world
from pyddl.config import Settings
from pyddl.topology.spec import Topology

_COLLECTIVES = (
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async_",
    "broadcast", "broadcast_", "broadcast_async_",
    "allgather", "allgather_async", "reduce_scatter", "reduce_scatter_async", "sparse_allreduce_async",
    "alltoall", "alltoall_async", "barrier", "join", "set_check", "new_communicator",
)

__all__ = [*_COLLECTIVES, "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
           "topology", "settings", "device"]


def _on_world(name: str):
    method = getattr(Communicator, name)

    @functools.wraps(method)
    def call(*args, **kwargs):
        return getattr(world(), name)(*args, **kwargs)

    signature = inspect.signature(method)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    del call.__wrapped__  # help() shows the signature above, without `self`
    call.__module__, call.__qualname__ = __name__, name
    return call


for _name in _COLLECTIVES:
    globals()[_name] = _on_world(_name)


def rank() -> int:
    """This process's rank in the job, 0..size()-1."""
    return world().rank


def size() -> int:
    """The number of processes in the job."""
    return world().size


def local_rank() -> int:
    """This process's index inside its server (the innermost dim)."""
    return world().local_rank


def local_size() -> int:
    """The number of processes on this server (the innermost dim)."""
    return world().local_size


def cross_rank() -> int:
    """The index of this process's server (ranks with the same local_rank, across servers)."""
    return world().cross_rank


def cross_size() -> int:
    """The number of servers."""
    return world().cross_size


def topology() -> Topology:
    """The job's topology (dims innermost first)."""
    return world().topology


def settings() -> Settings:
    """The settings the world communicator runs with."""
    return world().settings


def device() -> torch.device:
    """The device collectives run on (the local GPU under NCCL, else the CPU)."""
    return world().device

