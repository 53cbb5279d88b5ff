"""Topology arithmetic: ranks arranged as dims, innermost first (pure, no process group).

Vocabulary: a topology has *dims* (``4x2`` = 4 ranks per server x 2 servers); a rank has one
*coordinate* per dim; a *slice* of dim j is the set of ranks that differ only in coordinate j.
The multiring allreduce runs one ring per slice. Tensors have *axes*, never dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Topology", "parse_topology", "servers_from_keys", "sub_topology"]


@dataclass(frozen=True)
class Topology:
    """Ranks 0..size-1 laid out over `dims`, innermost (fastest-varying) first.

    Example:
        >>> t = Topology((2, 3))          # 2 ranks per server x 3 servers
        >>> t.coords(5), t.slice_ranks(5, 1)
        ((1, 2), (1, 3, 5))
    """

    dims: tuple[int, ...]

    def __post_init__(self):
        if not self.dims or any(not isinstance(d, int) or d < 1 for d in self.dims):
            raise ValueError(f"topology dims must be positive integers, got {self.dims!r}")

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def spec(self) -> str:
        return "x".join(map(str, self.dims))

    def stride(self, dim: int) -> int:
        return math.prod(self.dims[:dim])

    def coords(self, rank: int) -> tuple[int, ...]:
        """Coordinates of `rank`, innermost first."""
        return tuple((rank // self.stride(j)) % d for j, d in enumerate(self.dims))

    def slice_ranks(self, rank: int, dim: int) -> tuple[int, ...]:
        """Ranks of the slice of `dim` that contains `rank`, ordered by their coordinate."""
        base = rank - self.coords(rank)[dim] * self.stride(dim)
        return tuple(base + c * self.stride(dim) for c in range(self.dims[dim]))

    def slices(self, dim: int) -> list[tuple[int, ...]]:
        """Every slice of `dim`, in a fixed order all ranks agree on (by lowest member)."""
        seen = {}
        for r in range(self.size):
            ranks = self.slice_ranks(r, dim)
            seen.setdefault(ranks[0], ranks)
        return [seen[k] for k in sorted(seen)]

    def squeezed(self) -> "Topology":
        """The same layout without dims of size 1 (a 1-rank ring moves nothing)."""
        dims = tuple(d for d in self.dims if d > 1)
        return Topology(dims or (1,))

    def ring_steps(self) -> int:
        """Latency steps of one multiring allreduce: 2 x sum(d - 1) (a flat ring: 2(P-1))."""
        return 2 * sum(d - 1 for d in self.dims)


def parse_topology(spec: str, world_size: int | None = None) -> Topology:
    """Parse a spec such as ``4x2`` or ``2x2x2`` (innermost dim first) and check it.

    Args:
        spec: dims joined by "x"; a single number is one flat dim.
        world_size: if given, the product of the dims must equal it.

    Raises:
        ValueError: the spec is malformed or does not multiply to `world_size`.

    Example:
        >>> parse_topology("4x2", 8).dims
        (4, 2)
    """
    parts = str(spec).lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"topology {spec!r} is not of the form AxBxC (innermost first), e.g. '4x2' for "
            "4 ranks per server on 2 servers"
        ) from None
    if any(d < 1 for d in dims):
        raise ValueError(f"topology {spec!r} has a dim below 1; every dim must be >= 1")
    topo = Topology(dims)
    if world_size is not None and topo.size != world_size:
        raise ValueError(
            f"world size {world_size} does not match topology {spec} (= {topo.size} ranks); "
            f"pass a topology whose dims multiply to {world_size} (e.g. --topology "
            f"{_suggest(world_size, dims[0])}) or run {topo.size} processes"
        )
    return topo


def _suggest(world_size: int, inner: int) -> str:
    if inner > 1 and world_size % inner == 0 and world_size > inner:
        return f"{inner}x{world_size // inner}"
    return str(world_size)


def servers_from_keys(keys: list) -> Topology:
    """Derive the 2-level topology (ranks per server x servers) from each rank's server key.

    `keys[r]` identifies rank r's server (a node rank or a host name). Ranks of one server must
    be contiguous and every server must hold the same number of ranks.

    Raises:
        ValueError: a server's ranks are not contiguous, or servers hold different counts.
    """
    order: list = []
    members: dict = {}
    for rank, key in enumerate(keys):
        if key not in members:
            order.append(key)
            members[key] = []
        members[key].append(rank)
    for key in order:
        ranks = members[key]
        if ranks != list(range(ranks[0], ranks[0] + len(ranks))):
            raise ValueError(
                f"ranks of server {key!r} are {ranks}, not contiguous: pyddl needs each "
                "server's ranks numbered one after another; launch server by server (fill "
                "each server before the next, e.g. mpirun --map-by slot) or pass "
                "--topology / PYDDL_TOPOLOGY to state the layout"
            )
    counts = {key: len(members[key]) for key in order}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{k}: {n}" for k, n in counts.items())
        raise ValueError(
            f"servers hold different numbers of ranks ({listing}); the multiring layout needs "
            "the same count on each server: launch equal counts or pass --topology "
            f"{len(keys)} for one flat ring"
        )
    local = counts[order[0]]
    return Topology((local, len(order)))


def sub_topology(world: Topology, ranks) -> Topology:
    """The topology of a subset of `world`'s ranks, from where those ranks sit.

    A subset that is a grid (every combination of the coordinates it uses, such as one rank per
    server, or every rank of some servers) keeps one dim per world dim, of the number of
    coordinates it uses there: of 2 servers x 2 ranks, ranks (0, 2) are 1 x 2 (one rank on each
    of two servers: a cross-server ring), ranks (0, 1) are 2 x 1 (one server). Any other subset
    is grouped by server when each holds the same number of its ranks, else one flat ring.

    Args:
        world: the job's topology.
        ranks: sorted, distinct ranks of `world`.

    Example:
        >>> sub_topology(Topology((2, 2)), [0, 2]).dims
        (1, 2)
    """
    ranks = list(ranks)
    coords = [world.coords(r) for r in ranks]
    used = [sorted({c[j] for c in coords}) for j in range(len(world.dims))]
    grid = Topology(tuple(len(u) for u in used))
    # A grid lists the product of the used coordinates, innermost fastest, as sorted ranks do.
    expected = [tuple(used[j][(i // grid.stride(j)) % grid.dims[j]] for j in range(len(used)))
                for i in range(grid.size)]
    if coords == expected:
        return grid
    servers = [r // world.dims[0] for r in ranks]
    try:
        return servers_from_keys(servers)
    except ValueError:  # unequal servers: one flat ring over the subset
        return Topology((len(ranks),))
