"""pyddl: fully synchronous distributed training, with a topology-aware multiring allreduce.

The framework-neutral core: join the job with `init()`, then call collectives on tensors, on
the world communicator (`pyddl.allreduce(t)`) or on one over a subset of ranks
(`pyddl.new_communicator(ranks).allreduce(t)`). Framework adapters (pyddl.torch) and the `pyddl`
command build on these. Names load on first use: `import pyddl` alone does not import torch.
"""

from pyddl._lazy import lazy_exports
from pyddl.errors import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    NotInitializedError,
    NotMemberError,
    PyddlError,
)

__version__ = "0.1.0"

_API = (
    "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size", "topology", "settings",
    "device",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async_",
    "broadcast", "broadcast_", "broadcast_async_", "allgather", "allgather_async",
    "reduce_scatter", "reduce_scatter_async", "sparse_allreduce_async", "alltoall", "alltoall_async",
    "barrier", "join", "set_check", "new_communicator",
)
_EXPORTS = {
    **{name: "pyddl.api" for name in _API},
    **{name: "pyddl.runtime" for name in ("init", "shutdown", "is_initialized", "world")},
    "Communicator": "pyddl.comm.communicator",
    "Handle": "pyddl.comm.engine",
    "get_codec": "pyddl.comm.codecs",
    "Settings": "pyddl.config",
    "run": "pyddl.launch.func",  # Horovod's horovod.run
}

__all__ = [
    *_EXPORTS,
    "PyddlError",
    "NotInitializedError",
    "NotMemberError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
