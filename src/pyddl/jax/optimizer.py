"""Data-parallel training with optax: gradients averaged across ranks before any optimizer.

`DistributedOptimizer(tx)` is an optax.GradientTransformation that delegates to `tx` after one
fused allreduce of the gradients; it runs inside `jax.jit` (the allreduce is an ordered
io_callback) or outside. With backward_passes_per_step=k the gradients of k calls are averaged
locally and only every k-th call communicates (a lax.cond: the other calls move nothing).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pyddl.jax.ops import Average, allreduce, broadcast

__all__ = ["DistributedOptimizer", "allreduce_gradients", "broadcast_parameters", "broadcast_optimizer_state",
           "AccumulationState"]


def allreduce_gradients(grads, op: str = Average, compression=None, algorithm: str | None = None):
    """Average (by default) a gradient pytree across ranks: one fused allreduce per dtype.

    For hand-written loops; inside or outside jax.jit.

    Example:
        >>> grads = hvd.allreduce_gradients(jax.grad(loss)(params, batch))
    """
    return allreduce(grads, op=op, compression=compression, algorithm=algorithm)


def broadcast_parameters(params, root_rank: int = 0):
    """Return rank `root_rank`'s parameters on every rank (JAX arrays are immutable: use the result).

    Example:
        >>> params = hvd.broadcast_parameters(model.init(key, x), root_rank=0)
    """
    return broadcast(params, root_rank)


def broadcast_optimizer_state(opt_state, root_rank: int = 0):
    """Return rank `root_rank`'s optax state on every rank (counts, momenta, accumulators).

    Example:
        >>> opt_state = hvd.broadcast_optimizer_state(tx.init(params), root_rank=0)
    """
    return broadcast(opt_state, root_rank)


class AccumulationState(NamedTuple):
    """State of DistributedOptimizer with backward_passes_per_step > 1."""

    mini_step: jax.Array  # calls since the last communicating one
    acc_grads: Any  # their gradients, summed
    inner_state: Any  # the wrapped transformation's state


def DistributedOptimizer(tx: optax.GradientTransformation, op: str = Average, compression=None,
                         backward_passes_per_step: int = 1, algorithm: str | None = None
                         ) -> optax.GradientTransformation:
    """Wrap `tx` so `update` applies gradients reduced across all ranks (averaged by default).

    Args:
        tx: any optax GradientTransformation (its state and updates are the usual ones).
        op: Average (default), Sum, Min or Max over ranks.
        compression: None, "fp16" or "bf16" wire codec.
        backward_passes_per_step: k: the gradients of k `update` calls are averaged locally and
            reduced once, on the k-th call, which applies them; the other calls return zero
            updates. k steps of batch b then act as one step of batch k x b (optax.MultiSteps'
            mean; Horovod's torch optimizer sums, since torch accumulates .grad).
        algorithm: "native", "multiring" or "auto" (default: the job's setting).

    Returns:
        An optax.GradientTransformation; call `update(grads, state, params)` on every rank.

    Raises:
        ValueError: backward_passes_per_step below 1.

    Example:
        >>> tx = hvd.DistributedOptimizer(optax.sgd(0.1 * hvd.size(), momentum=0.9))
        >>> updates, opt_state = tx.update(grads, opt_state, params)  # inside jax.jit or not
    """
    k = int(backward_passes_per_step)
    if k < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")

    def reduce(grads):
        return allreduce(grads, op=op, compression=compression, algorithm=algorithm)

    if k == 1:
        def update(grads, state, params=None):
            return tx.update(reduce(grads), state, params)

        return optax.GradientTransformation(tx.init, update)

    def init(params):
        return AccumulationState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), tx.init(params))

    def update_k(grads, state, params=None):
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), state.acc_grads, grads)
        shapes = jax.eval_shape(lambda g, s, p: tx.update(g, s, p)[0], grads, state.inner_state, params)

        def apply(_):
            mean = jax.tree.map(lambda a, g: (a / k).astype(g.dtype), acc, grads)
            updates, inner = tx.update(reduce(mean), state.inner_state, params)
            return updates, inner, jax.tree.map(jnp.zeros_like, acc)

        def hold(_):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state.inner_state, acc

        updates, inner, acc = jax.lax.cond(state.mini_step == k - 1, apply, hold, None)
        return updates, AccumulationState((state.mini_step + 1) % k, acc, inner)

    return optax.GradientTransformation(init, update_k)
