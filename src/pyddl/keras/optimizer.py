"""DistributedOptimizer for Keras 3: wraps a Keras optimizer by composition, the way Keras's
own LossScaleOptimizer does, so `model.compile` takes it and `model.fit` applies gradients
combined over all ranks. Works on the TensorFlow backend (the reduction is a TF host
callback inside Keras's compiled train step).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pyddl.tensorflow.compression import Compression
from pyddl.tensorflow.gradients import GradientReduction
from pyddl.tensorflow.ops import Average, global_process_set

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer(keras.optimizers.Optimizer):
    """Wrap `optimizer` so each step applies gradients averaged (or summed) over all ranks.

    All state (variables, learning rate, iterations) is the wrapped optimizer's; this one
    only reduces the gradients before handing them on. Arguments are Horovod's.

    Args:
        optimizer: a Keras 3 optimizer (keras.optimizers.SGD, Adam, ...).
        name: the wrapper's name; default "Distributed" + the optimizer's class name.
        compression: hvd.Compression.none/fp16/bf16, or a Compressor of your own.
        sparse_as_dense: densify sparse gradients before reducing them.
        gradient_predivide_factor: with Average, 1/factor before the sum, factor/size after.
        op: hvd.Average (default), Sum, Min, Max or Product; Adasum raises NotImplementedError.
        backward_passes_per_step: k > 1 sums the gradients of k calls locally and reduces
            and applies them on every k-th call only (the other calls change no weight).
        average_aggregated_gradients: with k > 1, divide the local sum by k (Horovod's
            default, False, applies the sum).
        device_dense, device_sparse, num_groups, groups, process_set,
        scale_local_gradients: accepted for Horovod compatibility.

    Raises:
        ValueError: Keras runs on another backend than TensorFlow.
        TypeError: `optimizer` is not a Keras 3 optimizer.

    Example:
        >>> opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.01 * hvd.size(), momentum=0.9))
        >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    """

    def __init__(self, optimizer, name=None, device_dense="", device_sparse="", compression=Compression.none,
                 sparse_as_dense=False, gradient_predivide_factor=1.0, op=Average, backward_passes_per_step=1,
                 average_aggregated_gradients=False, num_groups=0, groups=None, process_set=global_process_set,
                 scale_local_gradients=True):
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"pyddl.keras runs on Keras's TensorFlow backend, and this process uses {keras.backend.backend()!r}; "
                "set KERAS_BACKEND=tensorflow (for torch, use pyddl.torch on the model's parameters)"
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"DistributedOptimizer wraps a Keras 3 optimizer (keras.optimizers.SGD, Adam, ...), got "
                f"{type(optimizer).__name__}; TF1 optimizers (tf.compat.v1.train) are not supported"
            )
        if int(backward_passes_per_step) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        reduction = GradientReduction(compression, sparse_as_dense, op, gradient_predivide_factor, num_groups,
                                      groups, process_set)
        super().__init__(learning_rate=0.0, name=name or f"Distributed{type(optimizer).__name__}")
        self.inner_optimizer = optimizer
        self._reduction = reduction
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.average_aggregated_gradients = average_aggregated_gradients

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        if self.backward_passes_per_step > 1:
            # Horovod's local aggregation (LocalGradientAggregationHelper): a sum per variable
            # and a count of the calls since the last reduction.
            self._local_sums = [self.add_variable_from_reference(v, name="local_sum") for v in var_list]
            self._local_count = self.add_variable(shape=(), dtype="int32", name="local_count")
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @tf.autograph.experimental.do_not_convert
    def apply(self, grads, trainable_variables=None):
        """Reduce `grads` over all ranks (one fused allreduce) and apply them; with
        backward_passes_per_step=k, add them to the local sums and do that every k-th call."""
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if self.backward_passes_per_step == 1:
            self.inner_optimizer.apply(self._reduction.reduce(list(grads)), trainable_variables)
            return
        for total, g in zip(self._local_sums, grads):
            if g is not None:
                total.assign_add(tf.convert_to_tensor(g))
        self._local_count.assign_add(1)
        k = self.backward_passes_per_step

        def reduce_and_apply():
            scale = 1.0 / k if self.average_aggregated_gradients else 1.0
            summed = [tf.convert_to_tensor(t) * tf.cast(scale, t.dtype) for t in self._local_sums]
            self.inner_optimizer.apply(self._reduction.reduce(summed), trainable_variables)
            for t in self._local_sums:
                t.assign(tf.zeros_like(t))
            self._local_count.assign(0)
            return tf.constant(True)

        # Every rank counts the same calls, so all take this branch, and its allreduce, together.
        tf.cond(tf.equal(tf.convert_to_tensor(self._local_count), k), reduce_and_apply, lambda: tf.constant(False))

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self.iterations

    def scale_loss(self, loss):
        # A LossScaleOptimizer inside scales the loss that Keras's train step differentiates.
        return self.inner_optimizer.scale_loss(loss)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def __getattr__(self, name):
        # Hyperparameters the callbacks and user code read (momentum, beta_1...) are the
        # wrapped optimizer's.
        if name.startswith("_") or name == "inner_optimizer":
            raise AttributeError(name)
        return getattr(self.inner_optimizer, name)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {"name": self.name,
                "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
