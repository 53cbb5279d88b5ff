"""pyddl.torch: Horovod's PyTorch API on pyddl — change `import horovod.torch as hvd` to
`import pyddl.torch as hvd` and the script runs under `pyddl run` (or torchrun, srun, mpirun).

Also: the overlapped DistributedOptimizer, DDP communication hooks, SyncBatchNorm on CPU
and GPU, join() for uneven data, and the torch.distributed backend "pyddl" (registered on
import). See docs/horovod.md, docs/torch.md and docs/backend.md.
"""

from pyddl.torch.capabilities import (
    ccl_built, cuda_built, ddl_built, gloo_built, gloo_enabled, mpi_built, mpi_enabled, mpi_threads_supported,
    nccl_built, rocm_built,
)
from pyddl.torch.compression import Compression
from pyddl.torch.ddp_hook import HookState, allreduce_hook, bf16_allreduce_hook, fp16_allreduce_hook, noop_hook
from pyddl.torch.functions import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from pyddl.torch.ops import (
    Adasum, Average, HorovodInternalError, Max, Min, Product, ProcessSet, Sum, allgather, allgather_async,
    allreduce, allreduce_, allreduce_async, allreduce_async_, alltoall, alltoall_async, barrier, broadcast,
    broadcast_, broadcast_async, broadcast_async_, cross_rank, cross_size, global_process_set, grouped_allreduce,
    grouped_allreduce_, grouped_allreduce_async, grouped_allreduce_async_, init, is_initialized, join, local_rank,
    local_size, poll, rank, reducescatter, reducescatter_async, shutdown, size, synchronize,
)
from pyddl.torch.optimizer import DistributedOptimizer
from pyddl.torch.sync_batch_norm import SyncBatchNorm
from pyddl.torch import backend as _backend  # noqa: F401  (registers init_process_group("pyddl"))

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size",
    "cross_rank", "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression",
    "ProcessSet", "global_process_set",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "allgather",
    "allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall",
    "alltoall_async", "reducescatter", "reducescatter_async", "synchronize", "poll", "join", "barrier",
    "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object",
    "DistributedOptimizer", "SyncBatchNorm", "HorovodInternalError",
    "allreduce_hook", "fp16_allreduce_hook", "bf16_allreduce_hook", "noop_hook", "HookState",
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built",
    "ddl_built", "ccl_built", "cuda_built", "rocm_built",
]
