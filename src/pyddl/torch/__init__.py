"""pyddl.torch: Horovod's PyTorch API on pyddl — change `import horovod.torch as hvd` to
`import pyddl.torch as hvd` and the script runs under `pyddl run` (or torchrun, srun, mpirun).

Horovod's elastic API is `pyddl.torch.elastic` (hvd.elastic.run, TorchState, ...), on the
restarts of `pyddl run --nnodes MIN:MAX`. Also: the overlapped DistributedOptimizer, DDP
communication hooks, SyncBatchNorm on CPU and GPU, join() for uneven data, and the
torch.distributed backend "pyddl" (registered on import). See docs/horovod.md, docs/torch.md
and docs/backend.md.
"""

from pyddl import __version__ as _pyddl_version
from pyddl.torch.capabilities import (
    ccl_built, cuda_built, ddl_built, gloo_built, gloo_enabled, mpi_built, mpi_enabled, mpi_threads_supported,
    nccl_built, rocm_built,
)
from pyddl.launch.func import run
from pyddl.torch import ops as _ops
from pyddl.torch.compression import Compression
from pyddl.torch.ddp_hook import HookState, allreduce_hook, bf16_allreduce_hook, fp16_allreduce_hook, noop_hook
from pyddl.torch.functions import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from pyddl.torch.ops import (
    Adasum, Average, HorovodInternalError, Max, Min, Product, ProcessSet, Sum, add_process_set, allgather,
    allgather_async,
    allreduce, allreduce_, allreduce_async, allreduce_async_, alltoall, alltoall_async, barrier, broadcast,
    broadcast_, broadcast_async, broadcast_async_, cross_rank, cross_size, global_process_set, grouped_allgather,
    grouped_allgather_async, grouped_allreduce, grouped_allreduce_, grouped_allreduce_async,
    grouped_allreduce_async_, grouped_reducescatter, grouped_reducescatter_async, init, is_homogeneous,
    is_initialized, join, local_rank, local_size, poll, rank, reducescatter, reducescatter_async, remove_process_set,
    shutdown, size, sparse_allreduce_async,
    start_timeline, stop_timeline, synchronize,
)
from pyddl.torch.optimizer import DistributedOptimizer, PartialDistributedOptimizer
from pyddl.torch.sync_batch_norm import SyncBatchNorm
from pyddl.torch import backend as _backend  # noqa: F401  (registers init_process_group("pyddl"))
from pyddl.torch import elastic
from pyddl.torch.elastic import HostsUpdatedInterrupt

__version__ = _pyddl_version

_ops.export_launch_environ()

__all__ = [
    "__version__", "run", "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size",
    "cross_rank", "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression",
    "ProcessSet", "global_process_set", "add_process_set", "remove_process_set",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "sparse_allreduce_async", "allgather",
    "allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall",
    "alltoall_async", "reducescatter", "reducescatter_async", "grouped_allgather", "grouped_allgather_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "start_timeline", "stop_timeline", "is_homogeneous",
    "synchronize", "poll", "join", "barrier", "PartialDistributedOptimizer",
    "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object",
    "DistributedOptimizer", "SyncBatchNorm", "HorovodInternalError", "HostsUpdatedInterrupt", "elastic",
    "allreduce_hook", "fp16_allreduce_hook", "bf16_allreduce_hook", "noop_hook", "HookState",
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built",
    "ddl_built", "ccl_built", "cuda_built", "rocm_built",
]
