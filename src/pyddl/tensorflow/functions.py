"""Horovod's state helpers for TensorFlow: broadcast variables and Python objects.

Variables travel as one flat broadcast per dtype, not one per variable: a Keras model has
hundreds of small variables, and each collective costs a round trip plus the cross-rank check.
Objects travel pickled (plain pickle where Horovod uses cloudpickle); only exchange them
between ranks of one job you trust, as with any pickle.
"""

from __future__ import annotations

import tensorflow as tf

from pyddl.tensorflow import bridge
from pyddl.tensorflow.ops import _check_process_set, _check_root, broadcast, global_process_set

__all__ = ["broadcast_variables", "broadcast_object", "allgather_object"]


@tf.autograph.experimental.do_not_convert
def broadcast_variables(variables, root_rank: int, process_set=global_process_set, inplace=False) -> None:
    """Assign rank `root_rank`'s values to `variables` on every rank.

    Args:
        variables: tf.Variables (Keras variables too), e.g. `model.variables` and
            `optimizer.variables`; the same list, in the same order, on every rank.
        root_rank: the rank whose values every rank ends with.
        process_set: only hvd.global_process_set.
        inplace: accepted for Horovod compatibility (the assignment is always in place).

    Raises:
        ValueError: `root_rank` is out of range.
        HorovodInternalError: ranks passed different shapes or dtypes.

    Example:
        >>> hvd.broadcast_variables(model.variables, root_rank=0)
    """
    _check_process_set(process_set)
    _check_root(root_rank)
    variables = list(variables)
    by_dtype: dict = {}
    for v in variables:
        value = tf.convert_to_tensor(v)  # Keras 3 variables give their dtype as a string
        by_dtype.setdefault(value.dtype, []).append((v, value))
    for group in by_dtype.values():
        flat = broadcast(tf.concat([tf.reshape(value, [-1]) for _, value in group], 0), root_rank)
        parts = tf.split(flat, [tf.size(value) for _, value in group])
        for (v, value), part in zip(group, parts):
            v.assign(tf.reshape(part, tf.shape(value)))

def broadcast_object(obj, root_rank: int = 0, session=None, name=None, process_set=global_process_set):
    """Return rank `root_rank`'s `obj` (any picklable object) on every rank (eager only).

    Raises:
        ValueError: `root_rank` is out of range.
        HorovodInternalError: a collective failed (a rank missing, say).
    """
    _check_process_set(process_set)
    return bridge.broadcast_object(obj, _check_root(root_rank))


def allgather_object(obj, session=None, name=None, process_set=global_process_set) -> list:
    """Return the list of every rank's `obj` (picklable), in rank order (eager only)."""
    _check_process_set(process_set)
    return bridge.allgather_object(obj)
