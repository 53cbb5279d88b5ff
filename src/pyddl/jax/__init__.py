"""pyddl.jax: Horovod's API for JAX, Flax and Optax on pyddl's core — `import pyddl.jax as hvd`.

Collectives take jax.Arrays or whole pytrees (one fused core collective per dtype) and return
jax.Arrays; allreduce, broadcast and reduce_scatter also run inside `jax.jit` as ordered
io_callbacks. `DistributedOptimizer` wraps any optax GradientTransformation. Needs the `jax`
extra (`pip install pyddl[jax]`); `import pyddl` never imports JAX. See docs/jax.md.
"""

from pyddl.jax.ops import (
    Average, Max, Min, Product, Sum, allgather, allreduce, barrier, broadcast, cross_rank, cross_size, init,
    is_initialized, local_rank, local_size, rank, reduce_scatter, shutdown, size,
)
from pyddl.jax.optimizer import (
    AccumulationState, DistributedOptimizer, allreduce_gradients, broadcast_optimizer_state, broadcast_parameters,
)
from pyddl.jax.recipe import Recipe, lr_schedule

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "Average", "Sum", "Min", "Max", "Product",
    "allreduce", "allgather", "broadcast", "reduce_scatter", "barrier",
    "DistributedOptimizer", "AccumulationState", "allreduce_gradients", "broadcast_parameters",
    "broadcast_optimizer_state", "Recipe", "lr_schedule",
]
