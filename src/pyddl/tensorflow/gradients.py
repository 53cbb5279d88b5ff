"""DistributedGradientTape, and the gradient reduction it shares with the Keras
DistributedOptimizer: every dense gradient of a step in one fused grouped allreduce (one host
call inside tf.function), sparse ones (tf.IndexedSlices) allgathered as Horovod does.
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from pyddl.tensorflow.compression import Compression
from pyddl.tensorflow.ops import Average, _check_process_set, allreduce, global_process_set, grouped_allreduce, size
from pyddl.torch.ops import Sum, reduce_op_name

__all__ = ["DistributedGradientTape", "GradientReduction"]


class GradientReduction:
    """How gradients are combined across ranks: Horovod's op, compression and predivide.

    Args:
        compression: hvd.Compression.none/fp16/bf16 or a Compressor of your own.
        sparse_as_dense: densify tf.IndexedSlices and allreduce them with the rest.
        op: hvd.Average (default), Sum, Min, Max or Product; Adasum is refused.
        gradient_predivide_factor: with Average, scale by 1/factor before the sum and by
            factor/size after it (Horovod's overflow control).
        num_groups, groups: accepted for Horovod compatibility; pyddl fuses all of a step's
            dense gradients into buckets of its own (one host call), whatever the groups.
    """

    def __init__(self, compression=Compression.none, sparse_as_dense=False, op=Average,
                 gradient_predivide_factor=1.0, num_groups=0, groups=None, process_set=global_process_set):
        _check_process_set(process_set)
        op_name = reduce_op_name(op)
        if gradient_predivide_factor <= 0:
            raise ValueError(f"gradient_predivide_factor must be positive, got {gradient_predivide_factor}")
        if gradient_predivide_factor != 1.0 and op_name != "average":
            raise ValueError("gradient_predivide_factor applies to op=Average only")
        if num_groups:
            warnings.warn("num_groups is replaced by groups in Horovod, and neither changes pyddl's fusion",
                          DeprecationWarning, stacklevel=3)
        self.op, self.pre, self.post = op, 1.0, 1.0
        if gradient_predivide_factor != 1.0:
            # Horovod moves the average into the scale factors of a sum.
            self.op, self.pre, self.post = Sum, 1.0 / gradient_predivide_factor, gradient_predivide_factor / size()
        self.compression = Compression.none if compression is None else compression
        self.sparse_as_dense = sparse_as_dense

    @tf.autograph.experimental.do_not_convert
    def reduce(self, grads: list) -> list:
        """Return `grads` combined over all ranks; None entries stay None."""
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) and self.sparse_as_dense else g
                 for g in grads]
        dense = [i for i, g in enumerate(grads) if g is not None and not isinstance(g, tf.IndexedSlices)]
        out = list(grads)
        if size() == 1:
            return out
        reduced = grouped_allreduce([grads[i] for i in dense], op=self.op, compression=self.compression,
                                    prescale_factor=self.pre, postscale_factor=self.post)
        for i, g in zip(dense, reduced):
            out[i] = g
        for i, g in enumerate(grads):
            if isinstance(g, tf.IndexedSlices):
                out[i] = allreduce(g, op=self.op, prescale_factor=self.pre, postscale_factor=self.post)
        return out


class DistributedGradientTape:
    """Wrap a tf.GradientTape so `gradient()` returns gradients combined over all ranks.

    Delegates everything else to the wrapped tape (composition; Horovod builds a subclass of
    the tape's class at run time). Arguments as Horovod's; see GradientReduction.

    Example:
        >>> with tf.GradientTape() as tape:
        ...     loss = loss_fn(model(x), y)
        >>> tape = hvd.DistributedGradientTape(tape)
        >>> grads = tape.gradient(loss, model.trainable_variables)
    """

    def __init__(self, gradtape, device_dense="", device_sparse="", compression=Compression.none,
                 sparse_as_dense=False, op=Average, gradient_predivide_factor=1.0, num_groups=0, groups=None,
                 process_set=global_process_set, scale_local_gradients=True):
        self._tape = gradtape
        self._reduction = GradientReduction(compression, sparse_as_dense, op, gradient_predivide_factor,
                                            num_groups, groups, process_set)
        self._scale_local_gradients = scale_local_gradients
        self._local_sources: set = set()

    def __getattr__(self, name):
        return getattr(self._tape, name)

    def __enter__(self):
        self._tape.__enter__()
        return self

    def __exit__(self, *exc):
        return self._tape.__exit__(*exc)

    def register_local_source(self, source) -> None:
        """Keep `source`'s gradient local: it is not reduced, only divided by size() when
        scale_local_gradients is set (Horovod's meaning)."""
        self._local_sources.add(id(source))

    @tf.autograph.experimental.do_not_convert
    def gradient(self, target, sources, output_gradients=None, use_generic_names=False):
        """Return d target / d sources, reduced over all ranks (the structure of `sources`)."""
        grads = self._tape.gradient(target, sources, output_gradients)
        flat_sources, flat_grads = tf.nest.flatten(sources), tf.nest.flatten(grads)
        local = [id(s) in self._local_sources for s in flat_sources]
        shared = self._reduction.reduce([g for g, lo in zip(flat_grads, local) if not lo])
        out, it = [], iter(shared)
        for g, lo in zip(flat_grads, local):
            if not lo:
                out.append(next(it))
            elif g is not None and self._scale_local_gradients:
                out.append(g / tf.cast(size(), g.dtype))
            else:
                out.append(g)
        return tf.nest.pack_sequence_as(sources, out)
