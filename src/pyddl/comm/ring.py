"""Ring reduce-scatter and allgather over one slice of ranks, built on tagged p2p sends.

Gloo's own reduce_scatter is several times slower than its allreduce on this machine, so the
rings are written with isend/irecv. Every message carries a tag unique to (call, stage,
chunk), which lets the pipelined multiring have the steps of several stages and chunks in
flight at once. Each ring is a generator of steps (post, yield the works, fold), so that one
thread can drive many rings together; `drive` runs one to the end.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["combine_", "drive", "equal_parts", "ring_allgather_steps", "ring_reduce_scatter_", "ring_reduce_scatter_steps"]


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


def _post(
    send: torch.Tensor | None,
    dst: int,
    recv: torch.Tensor | None,
    src: int,
    group,
    tag: int,
    recv_group=None,
) -> list:
    # Empty parts are skipped on both sides: both sides know the lengths.
    works = []
    if send is not None and send.numel():
        works.append(dist.isend(send, dst, group=group, tag=tag))
    if recv is not None and recv.numel():
        works.append(dist.irecv(recv, src, group=recv_group or group, tag=tag))
    return works


def drive(steps: Iterator[list]) -> None:
    """Run a ring's steps to the end on this thread, waiting for each step's messages."""
    for works in steps:
        for w in works:
            w.wait()


def ring_reduce_scatter_steps(
    buf: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    ranks: Sequence[int],
    me: int,
    group,
    op: str,
    tag: int,
    recv_group=None,
) -> Iterator[list]:
    """Reduce `buf` across `ranks` so that part `me` of rank `ranks[me]` holds the result.

    A generator: each step posts its send and receive and yields their works; resume it once
    they are done. Every step yields, with or without messages, so that every rank of the ring
    takes the same number of steps.

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
        yield _post(buf[send_start : send_start + send_len], nxt, incoming, prv, group, tag, recv_group)
        if recv_len:
            combine_(buf[recv_start : recv_start + recv_len], incoming, op)


def ring_allgather_steps(
    buf: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    ranks: Sequence[int],
    me: int,
    group,
    tag: int,
    recv_group=None,
) -> Iterator[list]:
    """Fill every part of `buf` from the ring member that owns it (member i owns part i).

    A generator of steps, as `ring_reduce_scatter_steps`."""
    d = len(ranks)
    if d == 1:
        return
    nxt, prv = ranks[(me + 1) % d], ranks[(me - 1) % d]
    for s in range(d - 1):
        send_start, send_len = parts[(me - s) % d]
        recv_start, recv_len = parts[(me - s - 1) % d]
        yield _post(buf[send_start : send_start + send_len], nxt, buf[recv_start : recv_start + recv_len], prv,
                    group, tag, recv_group)


def ring_reduce_scatter_(buf, parts, ranks, me, group, op, tag, recv_group=None) -> None:
    """`ring_reduce_scatter_steps` run to the end on this thread."""
    drive(ring_reduce_scatter_steps(buf, parts, ranks, me, group, op, tag, recv_group))
