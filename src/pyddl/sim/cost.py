"""Alpha-beta-gamma costs of allreduce algorithms on a multi-level cluster (pure Python).

A message of m bytes over one link costs alpha + m/rate, reducing m bytes costs m x gamma
(the MPICH model, Thakur et al. 2005). A `Fabric` lists, innermost first, each topology
level's link and how many ranks it spans; each algorithm maps its steps onto those levels,
with the ranks of one server sharing that server's links at every outer level. Caveats: links
are full duplex and contention-free apart from that sharing; no torch, no process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pyddl.defaults import CHUNK_BYTES

__all__ = [
    "ALGORITHMS",
    "DEFAULT_CHUNK_BYTES",
    "Level",
    "Fabric",
    "ring_allreduce_s",
    "halving_doubling_allreduce_s",
    "tree_allreduce_s",
    "native_s",
    "multiring_s",
    "halving_doubling_s",
    "tree_s",
    "allreduce_s",
    "auto_choice",
    "link_bound_s",
    "expected_max_normal",
    "straggler_wait_s",
]

# pyddl's multiring cuts buffers into pipeline chunks of this size (the library's default).
DEFAULT_CHUNK_BYTES = CHUNK_BYTES
# "auto" is pyddl's start-up tuner choosing the faster of native and multiring per size.
ALGORITHMS = ("native", "multiring", "auto", "hd", "tree")


@dataclass(frozen=True)
class Level:
    """One topology level's links, as one rank sees them.

    Attributes:
        name: a label, e.g. "nvlink" or "infiniband".
        latency_s: alpha, the fixed cost of one message (link latency plus per-step software).
        link_Bps: bytes/s one flow gets on one link of this level, each way.
        links: parallel links (NICs) a server has at this level; the server's ranks share
            links x link_Bps at every level but the innermost one.
    """

    name: str
    latency_s: float
    link_Bps: float
    links: int = 1

    def __post_init__(self):
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"level {self.name!r}: latency_s must be >= 0, got {self.latency_s!r}")
        if not (self.link_Bps > 0 and math.isfinite(self.link_Bps)):
            raise ValueError(f"level {self.name!r}: link_Bps must be > 0, got {self.link_Bps!r}")
        if not isinstance(self.links, int) or self.links < 1:
            raise ValueError(f"level {self.name!r}: links must be an integer >= 1, got {self.links!r}")


@dataclass(frozen=True)
class Fabric:
    """Ranks laid out server by server over `dims` (innermost first), one `Level` per dim.

    dims[0] ranks share a server (level 0 is the inside of a server); the product of the
    dims is the number of ranks. Outer dims may name the same `Level` (DDL ran 64 servers
    as 16x4 rings over one InfiniBand fabric): they then share its links. `gamma_s_per_byte`
    is the cost of reducing one byte.

    Example:
        >>> nvlink = Level("nvlink", 5e-6, 40e9)
        >>> ib = Level("ib", 6e-6, 12.5e9)
        >>> Fabric((nvlink, ib), (4, 64)).size
        256
    """

    levels: tuple[Level, ...]
    dims: tuple[int, ...]
    gamma_s_per_byte: float = 0.0
    stage_s: float = 0.0

    def __post_init__(self):
        if len(self.levels) != len(self.dims) or not self.dims:
            raise ValueError(
                f"a fabric needs one level per dim, got {len(self.levels)} levels for dims {self.dims}"
            )
        if any(not isinstance(d, int) or d < 1 for d in self.dims):
            raise ValueError(f"fabric dims must be positive integers, got {self.dims!r}")
        if not (self.gamma_s_per_byte >= 0 and math.isfinite(self.gamma_s_per_byte)):
            raise ValueError(f"gamma_s_per_byte must be >= 0, got {self.gamma_s_per_byte!r}")
        if not (self.stage_s >= 0 and math.isfinite(self.stage_s)):
            raise ValueError(f"stage_s must be >= 0, got {self.stage_s!r}")

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def with_host_load(self, load: float) -> "Fabric":
        """This fabric with its host costs (reduction and multiring stage times) multiplied
        by `load`: ranks per core, where more ranks than cores share a machine (an emulated
        cluster on one host); the links are unchanged."""
        return replace(self, gamma_s_per_byte=self.gamma_s_per_byte * load, stage_s=self.stage_s * load)

    @property
    def ranks_per_server(self) -> int:
        return self.dims[0]

    def flow_Bps(self, level: int, flows: int) -> float:
        """Rate of each of `flows` concurrent flows one server sends through `level`."""
        lv = self.levels[level]
        if level == 0:
            return lv.link_Bps  # point-to-point links inside the server: no sharing
        return lv.link_Bps * min(1.0, lv.links / max(1, flows))

    def crossing_level(self, a: int, b: int) -> int:
        """The outermost level at which ranks `a` and `b` differ (the link a message uses)."""
        level, stride = 0, 1
        for j, d in enumerate(self.dims):
            if (a // stride) % d != (b // stride) % d:
                level = j
            stride *= d
        return level


# ---- closed forms on one flat level (MPICH, Thakur et al.; ANCHORS.md) ----------------------


def ring_allreduce_s(n: int, nbytes: float, alpha: float, beta: float, gamma: float = 0.0) -> float:
    """Return 2(n-1) alpha + 2(n-1)/n S beta + (n-1)/n S gamma (ring allreduce, one level)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * alpha + (n - 1) / n * nbytes * (2 * beta + gamma)


def halving_doubling_allreduce_s(n: int, nbytes: float, alpha: float, beta: float, gamma: float = 0.0) -> float:
    """Return 2 lg(n) alpha + 2(n-1)/n S beta + (n-1)/n S gamma (Rabenseifner, n a power of 2)."""
    _require_power_of_two(n)
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * math.log2(n) * alpha + (n - 1) / n * nbytes * (2 * beta + gamma)


def tree_allreduce_s(n: int, nbytes: float, alpha: float, beta: float, gamma: float = 0.0) -> float:
    """Return 2 ceil(lg n)(alpha + S beta) + ceil(lg n) S gamma (binomial reduce + broadcast)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = math.ceil(math.log2(n))
    return 2 * steps * (alpha + nbytes * beta) + steps * nbytes * gamma


def _require_power_of_two(n: int) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(
            f"recursive halving/doubling is modelled for power-of-two rank counts only, got {n}; "
            "drop 'hd' from the algorithms or pick a power-of-two number of GPUs"
        )


# ---- topology-aware costs ------------------------------------------------------------------


def native_s(fabric: Fabric, nbytes: float) -> float:
    """Time the backend's flat ring over all ranks (Gloo's ring, NCCL's rings).

    Ranks sit server by server, so the ring crosses every active level and each of its
    2(P-1) steps lasts as long as its slowest hop. NCCL runs one ring per NIC (channels), so
    an outer level gives the ring links x link_Bps; each server boundary is one hop of one
    flow, so the flat ring moves 2(P-1)/P x S through every NIC, never less.
    """
    p = fabric.size
    if p <= 1 or nbytes <= 0:
        return 0.0
    m = nbytes / p
    hops = []
    for j, d in enumerate(fabric.dims):
        if d > 1:
            lv = fabric.levels[j]
            rate = lv.link_Bps if j == 0 else lv.link_Bps * lv.links
            hops.append(lv.latency_s + m / rate)
    return 2 * (p - 1) * max(hops) + (p - 1) * m * fabric.gamma_s_per_byte


def _level_stage_times(fabric: Fabric, chunk: float) -> list[tuple[Level, float, float, float, float]]:
    """(link, reduce-scatter, allgather, wire time of both, reduction time) of one chunk per active dim.

    Each stage's time includes its host time `fabric.stage_s`."""
    out = []
    for j, d in enumerate(fabric.dims):
        if d == 1:
            continue
        shard = chunk / math.prod(fabric.dims[:j])  # what the inner reduce-scatters left
        m = shard / d
        # Every rank of a server sends on its own ring of an outer level at once (DESIGN.md).
        rate = fabric.flow_Bps(j, fabric.ranks_per_server if j > 0 else 1)
        lat = fabric.levels[j].latency_s
        wire = m / rate
        rs = (d - 1) * (lat + wire + m * fabric.gamma_s_per_byte) + fabric.stage_s
        ag = (d - 1) * (lat + wire) + fabric.stage_s
        out.append((fabric.levels[j], rs, ag, 2 * (d - 1) * wire, (d - 1) * m * fabric.gamma_s_per_byte))
    return out


def multiring_s(
    fabric: Fabric, nbytes: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES, pipeline: bool = True
) -> float:
    """Time pyddl's multiring: per-level ring reduce-scatters inward-out, allgathers back.

    The buffer is cut into ceil(S / chunk_bytes) equal chunks that flow through the 2k stages
    (reduce-scatter of each level, then allgather of each level in reverse). pyddl has the
    stages of different chunks in flight together, so with `pipeline` the time is one chunk through every stage plus
    (chunks - 1) periods of the bottleneck: the slowest stage; a link, whose wire time the
    reduce-scatters and allgathers of every dim on it share; or the rank's own processor,
    which does every stage's reductions and host work (one thread drives every stage). Without `pipeline` (pyddl on NCCL) chunks run in turn.
    """
    if fabric.size <= 1 or nbytes <= 0:
        return 0.0
    n_chunks = max(1, math.ceil(nbytes / chunk_bytes))
    stages = _level_stage_times(fabric, nbytes / n_chunks)
    one_chunk = sum(rs + ag for _, rs, ag, _, _ in stages)
    if not pipeline:
        return n_chunks * one_chunk
    link_busy: dict[Level, float] = {}
    for link, _, _, wire, _ in stages:
        link_busy[link] = link_busy.get(link, 0.0) + wire
    slowest_stage = max(max(rs, ag) for _, rs, ag, _, _ in stages)
    processor = sum(red for *_, red in stages) + 2 * len(stages) * fabric.stage_s
    period = max(slowest_stage, max(link_busy.values()), processor)
    return one_chunk + (n_chunks - 1) * period


def _pairwise_step_s(fabric: Fabric, pairs: list[tuple[int, int]], m: float, reduce: bool) -> float:
    """Time one step where each (src, dst) sends m bytes; the slowest message sets the step."""
    flows: dict[tuple[int, int], int] = {}
    levels = []
    for src, dst in pairs:
        j = fabric.crossing_level(src, dst)
        levels.append((src, j))
        if j > 0:
            key = (src // fabric.ranks_per_server, j)
            flows[key] = flows.get(key, 0) + 1
    worst = 0.0
    for src, j in levels:
        n_flows = flows.get((src // fabric.ranks_per_server, j), 1)
        t = fabric.levels[j].latency_s + m / fabric.flow_Bps(j, n_flows)
        worst = max(worst, t)
    return worst + (m * fabric.gamma_s_per_byte if reduce else 0.0)


def halving_doubling_s(fabric: Fabric, nbytes: float) -> float:
    """Time recursive halving (reduce-scatter) then doubling (allgather), nearest partner first.

    Gloo's halving-doubling pairs rank r with r xor 2^k at step k, exchanging S/2^(k+1): the
    big early steps stay inside a server, and the steps that cross servers carry little.
    Needs a power-of-two number of ranks.
    """
    p = fabric.size
    _require_power_of_two(p)
    if p <= 1 or nbytes <= 0:
        return 0.0
    total = 0.0
    for k in range(int(math.log2(p))):
        pairs = [(r, r ^ (1 << k)) for r in range(p)]
        m = nbytes / 2 ** (k + 1)
        total += _pairwise_step_s(fabric, pairs, m, reduce=True)
        total += _pairwise_step_s(fabric, pairs, m, reduce=False)
    return total


def tree_s(fabric: Fabric, nbytes: float) -> float:
    """Time a binomial-tree reduce to rank 0 then broadcast, whole buffer per step, unpipelined.

    Step k pairs r with r + 2^k for r a multiple of 2^(k+1) (nearest partner first), so each
    server sends at most one flow per outer step. MPI's small-message algorithm; NCCL's
    pipelined double binary tree is not modelled.
    """
    p = fabric.size
    if p <= 1 or nbytes <= 0:
        return 0.0
    total = 0.0
    for k in range(math.ceil(math.log2(p))):
        pairs = [(r + (1 << k), r) for r in range(0, p, 1 << (k + 1)) if r + (1 << k) < p]
        total += _pairwise_step_s(fabric, pairs, nbytes, reduce=True)
        total += _pairwise_step_s(fabric, pairs, nbytes, reduce=False)
    return total


def allreduce_s(
    fabric: Fabric,
    algorithm: str,
    nbytes: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    pipeline: bool = True,
) -> float:
    """Predict the time of one allreduce of `nbytes` with `algorithm` on `fabric`.

    Args:
        algorithm: one of ALGORITHMS ("auto" is the faster of native and multiring, as
            pyddl's start-up tuner picks per message size).
        chunk_bytes, pipeline: the multiring's chunking (pyddl pipelines except on NCCL).

    Raises:
        ValueError: unknown algorithm, or "hd" on a rank count that is not a power of two.
    """
    if algorithm == "native":
        return native_s(fabric, nbytes)
    if algorithm == "multiring":
        return multiring_s(fabric, nbytes, chunk_bytes, pipeline)
    if algorithm == "auto":
        return allreduce_s(fabric, auto_choice(fabric, nbytes, chunk_bytes, pipeline), nbytes, chunk_bytes, pipeline)
    if algorithm == "hd":
        return halving_doubling_s(fabric, nbytes)
    if algorithm == "tree":
        return tree_s(fabric, nbytes)
    raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")


def auto_choice(fabric: Fabric, nbytes: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES, pipeline: bool = True) -> str:
    """The algorithm "auto" is modelled to run for `nbytes`: the faster of native and multiring."""
    return min(("native", "multiring"), key=lambda a: allreduce_s(fabric, a, nbytes, chunk_bytes, pipeline))


def link_bound_s(fabric: Fabric, nbytes: float) -> float:
    """Return T_min = 2(M-1)/M x S / B: M servers, B a server's level-1 links, free insides.

    No allreduce can beat it: every server must send (and receive) that much (DESIGN.md).
    """
    servers = fabric.size // fabric.ranks_per_server
    if servers <= 1 or nbytes <= 0 or len(fabric.levels) < 2:
        return 0.0
    lv = fabric.levels[1]
    return 2 * (servers - 1) / servers * nbytes / (lv.link_Bps * lv.links)


# ---- waiting for the slowest worker ---------------------------------------------------------


def expected_max_normal(n: int) -> float:
    """Return E[max of n independent standard normal draws] (0 for n = 1).

    The integral of x n phi(x) Phi(x)^(n-1) by Simpson's rule on [-12, 12]; exact to about
    1e-9 against the closed forms 1/sqrt(pi) (n = 2) and 3/(2 sqrt(pi)) (n = 3).

    Example:
        >>> round(expected_max_normal(2), 6)
        0.56419
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of workers must be an integer >= 1, got {n!r}")
    if n == 1:
        return 0.0
    steps, lo, hi = 4000, -12.0, 12.0
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        x = lo + i * h
        cdf = 0.5 * math.erfc(-x / math.sqrt(2.0))
        f = x * n * math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * cdf ** (n - 1)
        total += f * (1 if i in (0, steps) else 4 if i % 2 else 2)
    return total * h / 3


def straggler_wait_s(n: int, spread_s: float) -> float:
    """Return the expected wait for the slowest of `n` workers: spread_s x E[max of n normals].

    A synchronous step ends when its slowest worker's compute does. With each worker's step
    time normal around the mean with standard deviation `spread_s` (a per-step jitter, or a
    persistent per-GPU speed difference: the job runs at its slowest GPU), the step is longer
    than one worker's mean by this much on average. Zero for one worker or zero spread.
    """
    if not (spread_s >= 0 and math.isfinite(spread_s)):
        raise ValueError(f"step-time spread must be a finite number >= 0, got {spread_s!r}")
    return spread_s * expected_max_normal(n) if spread_s else 0.0
