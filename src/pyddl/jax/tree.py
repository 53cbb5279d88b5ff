"""Pytrees to and from the core's flat torch buffers: one buffer per dtype, read from JAX in place.

A leaf is read through DLPack (no copy) while it is packed into a buffer the adapter owns; the
core reduces that buffer in place; the results are handed back to JAX through DLPack as views
of it. XLA's CPU client aliases DLPack memory only at 64-byte alignment and copies otherwise,
so every leaf starts at a 64-byte offset. The cross-rank check compares whole pytrees (paths,
dtypes, shapes), so a mismatch names the first differing leaf, not a flat buffer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch

from pyddl.comm.fusion import Packing
from pyddl.errors import CollectiveMismatchError
from pyddl.jax._core import core

__all__ = ["DTYPES", "Leaves", "flatten", "agree", "buckets", "pack", "to_jax", "empty_like"]

# The dtypes the core's collectives carry, by the name JAX and torch share.
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "int8", "uint8")
_ALIGN_BYTES = 64


@dataclass(frozen=True)
class Leaves:
    """A flattened pytree: its structure, each leaf's path (jax.tree_util.keystr) and value."""

    treedef: object
    paths: tuple[str, ...]
    values: tuple

    def unflatten(self, values):
        return jax.tree_util.tree_unflatten(self.treedef, list(values))

    def traced(self) -> bool:
        return any(isinstance(v, jax.core.Tracer) for v in self.values)

    def describe(self, free_first_axis: bool = False) -> list[str]:
        """One line per leaf, `path: dtype[shape]` ("*" for an axis allowed to differ)."""
        lines = []
        for path, v in zip(self.paths, self.values):
            dims = [str(d) for d in v.shape]
            if free_first_axis and dims:
                dims[0] = "*"
            lines.append(f"{path or '(root)'}: {v.dtype}[{','.join(dims)}]")
        return lines


def flatten(tree, what: str, min_axes: int = 0) -> Leaves:
    """Flatten `tree`; numbers and numpy arrays become jax.Arrays; dtypes and axes are checked.

    Raises:
        TypeError: a leaf's dtype is one the core cannot carry (named by its path).
        ValueError: a leaf has fewer than `min_axes` axes (named by its path).
    """
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = tuple(jax.tree_util.keystr(p) for p, _ in pairs)
    values = tuple(v if isinstance(v, jax.Array) else jnp.asarray(v) for _, v in pairs)
    for path, v in zip(paths, values):
        if str(v.dtype) not in DTYPES:
            raise TypeError(f"pyddl.jax.{what}: leaf {path or '(root)'} has dtype {v.dtype}; "
                            f"supported: {', '.join(DTYPES)}")
        if v.ndim < min_axes:
            raise ValueError(f"pyddl.jax.{what}: leaf {path or '(root)'} is a scalar; it needs at least "
                             f"{min_axes} axis (reshape it to (1,))")
    return Leaves(treedef, paths, values)


def _ranks(ranks) -> str:
    return ",".join(map(str, ranks))


def _first_difference(what: str, texts: list[list[str]]) -> str:
    """Name the first leaf where the ranks' descriptions differ, and which ranks hold what."""
    longest = max(len(t) for t in texts)
    for i in range(longest):
        seen: dict[str, list[int]] = {}
        for r, lines in enumerate(texts):
            seen.setdefault(lines[i] if i < len(lines) else "(no such leaf)", []).append(r)
        if len(seen) > 1:
            variants = "; ".join(f"ranks {_ranks(rs)}: {text}" for text, rs in seen.items())
            return (f"pyddl.jax.{what}: the pytrees differ across ranks, first at leaf #{i} -- {variants}. "
                    f"Every rank must pass the same structure, dtypes and shapes")
    return f"pyddl.jax.{what}: the pytrees differ across ranks in structure ({len(texts[0])} leaves on every rank)"


def agree(what: str, leaves: Leaves, extra: list[int] | None = None, free_first_axis: bool = False):
    """Check that every rank passes the same pytree; return every rank's `extra` integers.

    One small allgather of [length, hash, *extra] per call (more only on a mismatch). It runs
    when the job's cross-rank check is on, or when `extra` must be gathered anyway.

    Raises:
        CollectiveMismatchError: on every rank, naming the first differing leaf and the ranks.
    """
    comm = core()
    if comm.size == 1 or (extra is None and not comm.settings.check):
        return [list(extra or [])]
    lines = leaves.describe(free_first_axis) + [f"treedef {leaves.treedef}"]
    text = "\n".join(lines).encode()
    digest = int.from_bytes(hashlib.sha1(text).digest()[:7], "little")
    mine = [3 + len(extra or []), digest, len(text)] + list(extra or [])
    flat = comm.allgather(torch.tensor(mine, dtype=torch.int64)).tolist()
    blocks, at = [], 0
    while at < len(flat):
        blocks.append(flat[at: at + flat[at]])
        at += flat[at]
    if len({(b[1], b[2]) for b in blocks}) > 1:
        gathered = comm.allgather(torch.frombuffer(bytearray(text), dtype=torch.uint8)).numpy().tobytes()
        texts, at = [], 0
        for b in blocks:
            texts.append(gathered[at: at + b[2]].decode().split("\n"))
            at += b[2]
        raise CollectiveMismatchError(_first_difference(what, texts))
    return [b[3:] for b in blocks]


def buckets(leaves: Leaves, skip_empty: bool = True) -> dict[str, list[int]]:
    """Indices of the (non-empty) leaves, grouped by dtype (one fused collective each)."""
    out: dict[str, list[int]] = {}
    for i, v in enumerate(leaves.values):
        if v.size or not skip_empty:
            out.setdefault(str(v.dtype), []).append(i)
    return out


def _aligned(numel: int, itemsize: int) -> int:
    per = _ALIGN_BYTES // itemsize
    return -(-numel // per) * per


def as_torch(value) -> torch.Tensor:
    """A torch view of a jax.Array's memory (a copy only for arrays spread over devices)."""
    if len(value.devices()) == 1:
        return torch.from_dlpack(value)
    return torch.from_numpy(np.array(value))


def pack(values, indices: list[int]) -> Packing:
    """Lay the leaves `indices` of `values` (one dtype) out in one new 1-D buffer, unwritten.

    Each leaf sits at a 64-byte-aligned offset (the spans of the returned Packing); its
    `fill(lo, hi)` copies the leaves in range by range (the alignment gaps are zeroed: they
    travel through the reduction too), which the core's allreduce does inside its pipeline.
    """
    dtype = getattr(torch, str(values[indices[0]].dtype))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    spans, width = [], 0
    for i in indices:
        n = int(values[i].size)
        spans.append((width, n))
        width += _aligned(n, itemsize)
    sources = [as_torch(values[i]).reshape(-1) for i in indices]
    return Packing(torch.empty(width, dtype=dtype, device=core().device), sources, spans)


def to_jax(tensor: torch.Tensor, like) -> jax.Array:
    """Hand `tensor` to JAX (no copy at 64-byte alignment) with `like`'s shape and placement."""
    out = jax.dlpack.from_dlpack(tensor.cpu().reshape(tuple(like.shape)))
    sharding = getattr(like, "sharding", None)
    if sharding is not None and not isinstance(like, jax.core.Tracer) and out.sharding != sharding:
        out = jax.device_put(out, sharding)
    return out


def empty_like(value, shape) -> jax.Array:
    """A jax.Array of `value`'s dtype and `shape` (which has no elements)."""
    return jnp.zeros(shape, value.dtype)
