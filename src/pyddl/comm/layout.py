"""Bucket layout: which tensors share a fusion bucket (pure arithmetic, no torch).

One bucket holds one dtype and closes once it holds the bucket size; a tensor is never split
across buckets. The simulator plans the buckets the library runs with it.
"""

from __future__ import annotations

from typing import Sequence

from pyddl.defaults import FUSION_BUCKET_BYTES as DEFAULT_BUCKET_BYTES

__all__ = ["plan_buckets", "DEFAULT_BUCKET_BYTES"]


def plan_buckets(
    items: Sequence[tuple[int, str, int]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    first_bucket_bytes: int | None = None,
) -> list[list[int]]:
    """Group tensors, in the order given, into buckets of one dtype of about `bucket_bytes`.

    Each tensor joins the open bucket of its dtype, and a bucket closes once it holds
    `bucket_bytes` or more, as PyTorch DDP's buckets do. So a tensor larger than the cap
    closes the bucket it joins, together with the small tensors before it: in a ResNet the
    BatchNorm gradients between two large convolutions ride with the next convolution instead
    of taking a collective of their own (ResNet-50 at 2 MiB: 25 buckets, not 44).

    Args:
        items: (numel, dtype name, bytes per element) of each tensor, in ready order.
        bucket_bytes: the size at which a bucket closes; a bucket can exceed it by less than
            its last tensor.
        first_bucket_bytes: where given, the first bucket of each dtype closes at the smaller
            of this and `bucket_bytes` (DDP's small first bucket: communication starts early).

    Returns:
        Lists of indices into `items`, ordered by each bucket's first tensor; each index
        appears exactly once.

    Example:
        >>> plan_buckets([(4, "float32", 4), (4, "float32", 4), (2, "int64", 8)], 32)
        [[0, 1], [2]]
        >>> plan_buckets([(1, "float32", 4), (100, "float32", 4), (1, "float32", 4)], 64)
        [[0, 1], [2]]
        >>> plan_buckets([(2, "float32", 4)] * 6, 32, first_bucket_bytes=16)
        [[0, 1], [2, 3, 4, 5]]
    """
    for name, size in (("bucket_bytes", bucket_bytes), ("first_bucket_bytes", first_bucket_bytes)):
        if size is not None and size <= 0:
            raise ValueError(f"{name} must be positive, got {size}")
    first_limit = bucket_bytes if first_bucket_bytes is None else min(first_bucket_bytes, bucket_bytes)
    buckets: list[list[int]] = []
    open_by_dtype: dict[str, tuple[list[int], int, int]] = {}  # bucket, bytes, where it closes
    started: set[str] = set()  # dtypes that have had a bucket
    for index, (numel, dtype, itemsize) in enumerate(items):
        bucket, nbytes, limit = open_by_dtype.pop(dtype, (None, 0, bucket_bytes))
        if bucket is None:
            bucket = []
            buckets.append(bucket)
            limit = bucket_bytes if dtype in started else first_limit
            started.add(dtype)
        bucket.append(index)
        nbytes += numel * itemsize
        if nbytes < limit:
            open_by_dtype[dtype] = (bucket, nbytes, limit)
    return buckets
