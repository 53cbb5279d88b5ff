"""Horovod's Keras callbacks for Keras 3: broadcast the initial state, average the metrics,
warm the learning rate up and schedule it, with Horovod's arguments and meaning.

The warmup is pyddl train's (pyddl.train.recipe.warmup_lr: Goyal et al.'s linear ramp from
lr/size to lr), evaluated on Horovod's clock (epoch + (batch + 1) / steps_per_epoch).
Momentum correction is not applied: a Keras 3 optimizer's momentum is a Python float that
Keras compiles into its train step, so changing it between batches has no effect.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from pyddl.tensorflow.functions import broadcast_variables
from pyddl.tensorflow.ops import Average, grouped_allreduce, size
from pyddl.train.recipe import warmup_lr

__all__ = [
    "BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Give every rank rank `root_rank`'s model and optimizer variables after the first batch
    (Horovod's timing: the optimizer's variables exist only once it has stepped).

    Args:
        root_rank: the rank whose variables every rank takes.
        device: accepted for Horovod compatibility.
    """

    def __init__(self, root_rank, device=""):
        super().__init__()
        self.root_rank = root_rank
        self.broadcast_done = False
        self._local_vars: set = set()

    def register_local_var(self, var) -> None:
        """Leave `var` out of the broadcast (a worker-local variable)."""
        self._local_vars.add(id(var))

    def on_batch_end(self, batch, logs=None):
        if self.broadcast_done:
            return
        variables = [v for v in self.model.variables if id(v) not in self._local_vars]
        broadcast_variables(variables, root_rank=self.root_rank)
        broadcast_variables(self.model.optimizer.variables, root_rank=self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each epoch's logged metrics by their average over all ranks, in place, so the
    callbacks after it (checkpointing, early stopping) see the job's values. Put it before them.

    One fused allreduce of every metric (in sorted key order, as Horovod) per epoch.
    """

    def __init__(self, device=""):
        super().__init__()

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        keys = sorted(logs)
        values = grouped_allreduce([tf.constant(float(logs[k]), tf.float64) for k in keys], op=Average)
        for k, v in zip(keys, values):
            logs[k] = float(v)


def _get_lr(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Set the learning rate to initial_lr * multiplier(epoch) from start_epoch to end_epoch.

    Args:
        initial_lr: the rate the multiplier scales (usually the single-worker lr x size()).
        multiplier: a function of the epoch, or a constant c for c ** (epoch - start_epoch).
        start_epoch, end_epoch: the epochs [start, end) the schedule applies to.
        staircase: change at the start of each epoch only; else every batch, on the
            fractional epoch + batch / steps_per_epoch.
        momentum_correction: accepted; not applied on Keras 3 (see the module's docstring).
        steps_per_epoch: batches per epoch; default: read from model.fit's parameters.

    Raises:
        ValueError: initial_lr is None, or steps_per_epoch is needed and cannot be found.
    """

    def __init__(self, initial_lr, multiplier, start_epoch=0, end_epoch=None, staircase=True,
                 momentum_correction=True, steps_per_epoch=None):
        super().__init__()
        if initial_lr is None:
            raise ValueError("Parameter `initial_lr` is required")
        self.initial_lr = initial_lr
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = None
        if callable(multiplier):
            self.multiplier = multiplier
        else:
            self.multiplier = lambda epoch: multiplier ** (epoch - start_epoch)

    def _autodetect_steps_per_epoch(self) -> int:
        if self.params.get("steps"):
            return self.params["steps"]
        if self.params.get("samples") and self.params.get("batch_size"):
            return self.params["samples"] // self.params["batch_size"]
        raise ValueError(f"could not find the number of steps per epoch; pass steps_per_epoch= to "
                         f"{type(self).__name__}()")

    def _adjust_learning_rate(self, epoch: float) -> None:
        self.model.optimizer.learning_rate = self.initial_lr * self.multiplier(epoch)

    def on_train_begin(self, logs=None):
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._autodetect_steps_per_epoch()
        if self.momentum_correction and getattr(self.model.optimizer, "momentum", 0):
            warnings.warn("momentum_correction is not applied on Keras 3 (the optimizer's momentum is compiled "
                          "into the train step); pass momentum_correction=False to silence this", stacklevel=2)

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_batch_begin(self, batch, logs=None):
        if self.current_epoch < self.start_epoch or (self.end_epoch is not None and self.current_epoch >= self.end_epoch):
            return
        if self.staircase and batch == 0:
            self._adjust_learning_rate(self.current_epoch)
        elif not self.staircase:
            self._adjust_learning_rate(self.current_epoch + float(batch) / self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = _get_lr(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Ramp the learning rate linearly from initial_lr / size() to initial_lr over the first
    `warmup_epochs` epochs, changing it every batch (Goyal et al. 2017; Horovod's formula
    lr = initial_lr / size * (e * (size - 1) / warmup_epochs + 1), e = epoch + (batch + 1) / steps).

    Args:
        initial_lr: the rate reached at the end of the warmup (the single-worker lr x size()).
        warmup_epochs: its length in epochs.
        momentum_correction: accepted; not applied on Keras 3.
        steps_per_epoch: batches per epoch; default: read from model.fit's parameters.
        verbose: 1 prints when the warmup ends.
    """

    def __init__(self, initial_lr, warmup_epochs=5, momentum_correction=True, steps_per_epoch=None, verbose=0):
        def multiplier(epoch):
            # Horovod shifts the clock by one batch, so an epoch ends on a round rate.
            epoch += 1.0 / self.steps_per_epoch
            return warmup_lr(epoch, warmup_epochs, self.initial_lr / size(), self.initial_lr) / self.initial_lr

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.verbose = verbose

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {_get_lr(self.model.optimizer):g}.")
