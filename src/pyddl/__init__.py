"""pyddl: fully synchronous distributed training for PyTorch.

The framework-neutral core: join the job with `init()`, then call collectives on tensors.
Framework adapters (pyddl.torch) and the `pyddl` command build on these.
"""

from pyddl.comm.codecs import get_codec
from pyddl.comm.engine import Handle
from pyddl.comm.ops import (
    allgather,
    allgather_async,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async_,
    grouped_allreduce_,
    grouped_allreduce_async_,
    join,
    reduce_scatter,
    reduce_scatter_async,
    set_check,
)
from pyddl.errors import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    NotInitializedError,
    PyddlError,
)
from pyddl.runtime import (
    cross_rank,
    cross_size,
    device,
    init,
    is_initialized,
    local_rank,
    local_size,
    rank,
    settings,
    shutdown,
    size,
    topology,
)

__version__ = "0.1.0"

__all__ = [
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "cross_rank",
    "cross_size",
    "topology",
    "settings",
    "device",
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
    "get_codec",
    "Handle",
    "PyddlError",
    "NotInitializedError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
]
