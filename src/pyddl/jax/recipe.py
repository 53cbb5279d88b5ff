"""The large-minibatch recipe (Goyal et al. 2017) as an optax schedule, from `pyddl train`'s own code.

`lr_schedule(recipe)` tabulates `pyddl.train.recipe.Recipe.at` over every optimizer step of
the run: linear scaling to the global batch, gradual warmup, step or cosine decay, and the
learning rate following a batch ramp. The table is indexed by optax's step count, so the
schedule is jit-friendly; past the last step it holds the last rate. With a batch ramp, take
epoch e's batch from `recipe.global_batch_at(e)`: the rates already follow it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pyddl.train.recipe import Recipe

__all__ = ["Recipe", "lr_schedule"]


def lr_schedule(recipe: Recipe):
    """Return an optax schedule (step count -> learning rate) for `recipe`'s whole run.

    Example:
        >>> r = Recipe(base_lr=0.1, base_batch=256, epochs=90, train_size=1_281_167,
        ...            global_batch=256 * hvd.size(), warmup_epochs=5)
        >>> tx = hvd.DistributedOptimizer(optax.sgd(hvd.lr_schedule(r), momentum=0.9))
    """
    rates = [recipe.at(e, s)[0] for e in range(recipe.epochs) for s in range(recipe.steps_in_epoch(e))]
    table = jnp.asarray(np.asarray(rates, dtype=np.float32))
    last = len(rates) - 1

    def schedule(count):
        return table[jnp.clip(count, 0, last)]

    return schedule

