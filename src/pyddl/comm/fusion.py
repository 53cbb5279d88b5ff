"""Tensor fusion: pack many small tensors into one flat bucket, and unpack after.

Which tensors share a bucket is pure arithmetic (pyddl.comm.layout.plan_buckets); these do
the copies.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["pack", "unpack"]


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
