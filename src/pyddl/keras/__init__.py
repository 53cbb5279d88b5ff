"""pyddl.keras: Horovod's Keras API for Keras 3 on the TensorFlow backend — change `import
horovod.keras as hvd` (or horovod.tensorflow.keras) to `import pyddl.keras as hvd`.

DistributedOptimizer wraps a Keras optimizer; `hvd.callbacks` holds Horovod's callbacks; the
ops are pyddl.tensorflow's (they take tensors, NumPy arrays and Python numbers, and return
tf tensors as Horovod's do in eager mode). See docs/tensorflow.md.
"""

from pyddl.keras import callbacks
from pyddl.keras.callbacks import (
    BroadcastGlobalVariablesCallback, LearningRateScheduleCallback, LearningRateWarmupCallback, MetricAverageCallback,
)
from pyddl.keras.optimizer import DistributedOptimizer
from pyddl.tensorflow import (
    Adasum, Average, Compression, HorovodInternalError, Max, Min, Product, ProcessSet, Sum, allgather,
    allgather_object, allreduce, alltoall, barrier, broadcast, broadcast_object, broadcast_variables, cross_rank,
    cross_size, global_process_set, grouped_allreduce, init, is_initialized, join, local_rank, local_size, rank,
    reducescatter, shutdown, size,
)

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size", "cross_rank",
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression", "ProcessSet", "global_process_set",
    "allreduce", "grouped_allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "join", "barrier",
    "broadcast_variables", "broadcast_object", "allgather_object", "broadcast_global_variables",
    "DistributedOptimizer", "HorovodInternalError", "callbacks", "BroadcastGlobalVariablesCallback",
    "MetricAverageCallback", "LearningRateScheduleCallback", "LearningRateWarmupCallback",
]


def broadcast_global_variables(root_rank: int) -> None:
    """Horovod's TF1-era name: Keras 3 has no global variable collection, so pass the
    variables to broadcast_variables (model.variables, optimizer.variables) instead."""
    raise NotImplementedError(
        "broadcast_global_variables needs TF1's global collection; use "
        "hvd.broadcast_variables(model.variables, root_rank) or hvd.callbacks.BroadcastGlobalVariablesCallback"
    )
