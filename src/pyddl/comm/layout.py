"""Bucket layout: which tensors share a fusion bucket (pure arithmetic, no torch).

One bucket holds one dtype, and a tensor larger than the bucket size gets a bucket of its own
(it is never split across buckets). The simulator plans the buckets the library runs with it.
"""

from __future__ import annotations

from typing import Sequence

from pyddl.defaults import FUSION_BUCKET_BYTES as DEFAULT_BUCKET_BYTES

__all__ = ["plan_buckets", "DEFAULT_BUCKET_BYTES"]


def plan_buckets(
    items: Sequence[tuple[int, str, int]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[list[int]]:
    """Group tensors, in the order given, into buckets of one dtype and at most `bucket_bytes`.

    Args:
        items: (numel, dtype name, bytes per element) of each tensor, in ready order.
        bucket_bytes: the cap of one bucket; a single larger tensor still gets its own bucket.

    Returns:
        Lists of indices into `items`; each index appears exactly once.

    Example:
        >>> plan_buckets([(4, "float32", 4), (4, "float32", 4), (2, "int64", 8)], 32)
        [[0, 1], [2]]
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    open_by_dtype: dict[str, tuple[list[int], int]] = {}
    for index, (numel, dtype, itemsize) in enumerate(items):
        nbytes = numel * itemsize
        current = open_by_dtype.get(dtype)
        if current is not None and current[1] + nbytes <= bucket_bytes:
            current[0].append(index)
            open_by_dtype[dtype] = (current[0], current[1] + nbytes)
            continue
        bucket = [index]
        buckets.append(bucket)
        open_by_dtype[dtype] = (bucket, nbytes)
    return buckets
