"""pyddl.tensorflow: Horovod's TensorFlow API on pyddl — change `import horovod.tensorflow as
hvd` to `import pyddl.tensorflow as hvd` and the script runs under `pyddl run` (or torchrun,
srun, mpirun) on current TensorFlow.

The ops work on tf.Tensor and tf.Variable, eagerly and inside tf.function (as host
callbacks); DistributedGradientTape and DistributedOptimizer combine gradients over all
ranks. `pyddl.tensorflow.keras` (the same as `pyddl.keras`) holds the Keras 3 API. See
docs/tensorflow.md.
"""

from pyddl.tensorflow.compression import Compression
from pyddl.tensorflow.functions import allgather_object, broadcast_object, broadcast_variables
from pyddl.tensorflow.gradients import DistributedGradientTape
from pyddl.tensorflow.ops import (
    Adasum, Average, HorovodInternalError, Max, Min, Product, ProcessSet, Sum, allgather, allreduce, alltoall,
    barrier, broadcast, cross_rank, cross_size, global_process_set, grouped_allreduce, init, is_initialized, join,
    local_rank, local_rank_op, local_size, local_size_op, rank, rank_op, reducescatter, shutdown, size, size_op,
)
from pyddl.torch.capabilities import (
    ccl_built, cuda_built, ddl_built, gloo_built, gloo_enabled, mpi_built, mpi_enabled, mpi_threads_supported,
    nccl_built, rocm_built,
)

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size", "cross_rank",
    "size_op", "rank_op", "local_size_op", "local_rank_op",
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression", "ProcessSet", "global_process_set",
    "allreduce", "grouped_allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "join", "barrier",
    "broadcast_variables", "broadcast_object", "allgather_object", "DistributedGradientTape",
    "DistributedOptimizer", "HorovodInternalError",
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built",
    "ddl_built", "ccl_built", "cuda_built", "rocm_built",
]


def DistributedOptimizer(optimizer, name=None, use_locking=False, device_dense="", device_sparse="",
                         compression=Compression.none, sparse_as_dense=False, backward_passes_per_step=1,
                         op=Average, gradient_predivide_factor=1.0, average_aggregated_gradients=False,
                         num_groups=0, groups=None, process_set=global_process_set, scale_local_gradients=True):
    """Wrap a Keras 3 optimizer so `apply_gradients` (and model.fit) applies gradients combined
    over all ranks: pyddl.keras.DistributedOptimizer, as Horovod's TF2 API does for Keras
    optimizers. TF1 optimizers (tf.compat.v1.train) raise TypeError.
    """
    from pyddl.keras.optimizer import DistributedOptimizer as KerasDistributedOptimizer

    return KerasDistributedOptimizer(
        optimizer, name=name, device_dense=device_dense, device_sparse=device_sparse, compression=compression,
        sparse_as_dense=sparse_as_dense, gradient_predivide_factor=gradient_predivide_factor, op=op,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, num_groups=num_groups, groups=groups,
        process_set=process_set, scale_local_gradients=scale_local_gradients,
    )
