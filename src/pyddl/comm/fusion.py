"""Tensor fusion: pack many small tensors into flat buckets, and unpack after.

`plan_buckets` is pure arithmetic over (numel, dtype name) pairs so it is tested without
tensors; `pack`/`unpack` do the copies. One bucket holds one dtype, and a tensor larger than
the bucket size gets a bucket of its own (it is never split across buckets).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["plan_buckets", "pack", "unpack", "DEFAULT_BUCKET_BYTES"]

from pyddl.defaults import FUSION_BUCKET_BYTES as DEFAULT_BUCKET_BYTES


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


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Copy `tensors` (one dtype) into one flat buffer, in order.

    `out` may have another dtype (a wire dtype); `scale` multiplies in the tensors' own dtype
    during the same pass, before any narrowing cast.
    """
    total = sum(t.numel() for t in tensors)
    if out is None:
        out = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        n = t.numel()
        if scale == 1.0:
            out[offset : offset + n].copy_(t.reshape(-1))
        else:
            torch.mul(t.reshape(-1), scale, out=out[offset : offset + n])
        offset += n
    return out


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy slices of `flat` back into `tensors`, in order (the inverse of `pack`)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
