"""Ring reduce-scatter and allgather over one slice of ranks, built on tagged p2p sends.

Gloo's own reduce_scatter is several times slower than its allreduce on this machine, so the
rings are written with isend/irecv. Every message carries a tag unique to (call, stage,
chunk), which lets the pipelined multiring run stages of different chunks concurrently on
different threads without the ranks having to agree on the interleaving.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["combine_", "ring_reduce_scatter_", "ring_allgather_", "equal_parts"]


def combine_(acc: torch.Tensor, other: torch.Tensor, op: str) -> None:
    """acc <- acc (op) other, elementwise, in place; average is summed here, divided later."""
    if op in ("sum", "average"):
        acc.add_(other)
    elif op == "min":
        torch.minimum(acc, other, out=acc)
    elif op == "max":
        torch.maximum(acc, other, out=acc)
    elif op == "product":
        acc.mul_(other)
    else:
        raise ValueError(f"unknown reduction {op!r}")


def equal_parts(start: int, length: int, d: int) -> list[tuple[int, int]]:
    """Split [start, start+length) into d (start, length) parts, the first ones larger."""
    base, extra = divmod(length, d)
    parts, offset = [], start
    for i in range(d):
        n = base + (1 if i < extra else 0)
        parts.append((offset, n))
        offset += n
    return parts


def _exchange(
    send: torch.Tensor | None,
    dst: int,
    recv: torch.Tensor | None,
    src: int,
    group,
    tag: int,
    recv_group=None,
) -> None:
    # Empty parts are skipped on both sides: both sides know the lengths.
    works = []
    if send is not None and send.numel():
        works.append(dist.isend(send, dst, group=group, tag=tag))
    if recv is not None and recv.numel():
        works.append(dist.irecv(recv, src, group=recv_group or group, tag=tag))
    for w in works:
        w.wait()


def ring_reduce_scatter_(
    buf: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    ranks: Sequence[int],
    me: int,
    group,
    op: str,
    tag: int,
    recv_group=None,
) -> None:
    """Reduce `buf` across `ranks` so that part `me` of rank `ranks[me]` holds the result.

    Args:
        buf: 1-D contiguous buffer; only the parts' ranges are touched.
        parts: one (start, length) per ring member, in member order.
        ranks: global ranks of the ring, ordered by coordinate; `ranks[me]` is this process.
        group: the process group this rank sends on (the slice's).
        tag: p2p tag unique to this call of the ring.
        recv_group: the group it receives on, if not `group` (2-rank rings: one per direction).
    """
    d = len(ranks)
    if d == 1:
        return
    nxt, prv = ranks[(me + 1) % d], ranks[(me - 1) % d]
    scratch = torch.empty(max(n for _, n in parts), dtype=buf.dtype, device=buf.device)
    # Step s: send the partial sum of part (me-s-1), receive and fold part (me-s-2); after
    # d-1 steps the last part folded is `me` itself, holding every rank's contribution.
    for s in range(d - 1):
        send_start, send_len = parts[(me - s - 1) % d]
        recv_start, recv_len = parts[(me - s - 2) % d]
        incoming = scratch[:recv_len]
        _exchange(buf[send_start : send_start + send_len], nxt, incoming, prv, group, tag, recv_group)
        if recv_len:
            combine_(buf[recv_start : recv_start + recv_len], incoming, op)


def ring_allgather_(
    buf: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    ranks: Sequence[int],
    me: int,
    group,
    tag: int,
    recv_group=None,
) -> None:
    """Fill every part of `buf` from the ring member that owns it (member i owns part i)."""
    d = len(ranks)
    if d == 1:
        return
    nxt, prv = ranks[(me + 1) % d], ranks[(me - 1) % d]
    for s in range(d - 1):
        send_start, send_len = parts[(me - s) % d]
        recv_start, recv_len = parts[(me - s - 1) % d]
        _exchange(
            buf[send_start : send_start + send_len],
            nxt,
            buf[recv_start : recv_start + recv_len],
            prv,
            group,
            tag,
            recv_group,
        )
