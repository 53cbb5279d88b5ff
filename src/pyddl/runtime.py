"""Joining the job: `init()` / `shutdown()`, rank queries, and the per-process state.

`init()` reads the launcher's environment (see pyddl.env), creates the world process group
(NCCL when CUDA is present, else Gloo) unless the user already did, derives the topology and
creates one process group per slice of each dim, once. Every collective then runs through
`run_collective`, which numbers it, checks it matches on all ranks and names missing ranks if
it fails.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from pyddl import defaults
from pyddl import env as _env
from pyddl.comm.engine import Engine
from pyddl.comm.guard import Monitor, OpInfo, exchange
from pyddl.comm.multiring import Level
from pyddl.errors import CollectiveTimeoutError, NotInitializedError, PyddlError
from pyddl.timeline import TIMELINE_ENV, Timeline
from pyddl.topology.spec import Topology, parse_topology, servers_from_keys

__all__ = [
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "cross_rank",
    "cross_size",
    "topology",
    "settings",
    "device",
    "run_collective",
    "world_group",
    "resync_seq",
    "timeline",
    "Settings",
    "ALGORITHMS",
]

ALGORITHMS = ("native", "multiring", "auto")
_DEFAULT_TIMEOUT_S = 300.0
_tune_lock = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """How collectives run in this job (each field also an env var and a `pyddl run` flag)."""

    allreduce: str = "native"
    timeout_s: float = _DEFAULT_TIMEOUT_S
    chunk_bytes: int = defaults.CHUNK_BYTES
    check: bool = True
    stall_warn_s: float | None = None  # default: min(60 s, timeout / 2)


@dataclass
class _State:
    job: _env.JobEnv
    backend: str
    device: torch.device
    topology: Topology
    settings: Settings
    levels: list[Level]
    world: Any
    engine: Engine
    monitor: Monitor
    owns_world: bool
    timeline: Timeline
    seq: int = 0
    tuned: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_state: _State | None = None
_init_lock = threading.Lock()


def _resolve_settings(allreduce, timeout_s, chunk_bytes) -> Settings:
    alg = (allreduce or os.environ.get(_env.PYDDL_ALLREDUCE) or "native").lower()
    if alg not in ALGORITHMS:
        raise ValueError(
            f"unknown allreduce algorithm {alg!r}; choose one of {', '.join(ALGORITHMS)} "
            f"(pyddl.init(allreduce=...), {_env.PYDDL_ALLREDUCE} or pyddl run --allreduce)"
        )
    timeout = float(timeout_s if timeout_s is not None else os.environ.get(_env.PYDDL_TIMEOUT, _DEFAULT_TIMEOUT_S))
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    chunk = int(chunk_bytes if chunk_bytes is not None else os.environ.get(_env.PYDDL_CHUNK_BYTES, defaults.CHUNK_BYTES))
    if chunk <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk}")
    check = os.environ.get(_env.PYDDL_CHECK, "1") not in ("0", "false", "off")
    stall = os.environ.get(_env.PYDDL_STALL_WARN)
    return Settings(alg, timeout, chunk, check, float(stall) if stall else None)


def _detect_topology(job: _env.JobEnv, spec: str | None, world) -> Topology:
    spec = spec or os.environ.get(_env.PYDDL_TOPOLOGY)
    if spec:
        return parse_topology(spec, job.world_size)
    if job.world_size == 1:
        return Topology((1,))
    if job.node_rank is not None and job.local_size is not None:
        key: Any = job.node_rank
    else:
        key = _env.host_identity()
    keys: list = [None] * job.world_size
    dist.all_gather_object(keys, key, group=world)
    return servers_from_keys(keys)


def _make_levels(topo: Topology, my_rank: int, timeout: timedelta) -> list[Level]:
    levels = []
    for dim, d in enumerate(topo.dims):
        if d == 1:
            continue
        mine = None
        # new_group is collective over the world: every rank creates every slice, in order.
        for ranks in topo.slices(dim):
            group = dist.new_group(list(ranks), timeout=timeout)
            reverse = dist.new_group(list(ranks), timeout=timeout) if d == 2 else None
            if my_rank in ranks:
                mine = Level(d, ranks, ranks.index(my_rank), group, reverse)
        levels.append(mine)
    return levels


_JOIN_GRACE_S = 10.0  # how much later than rank 0 another rank may start waiting


def _join(job: _env.JobEnv, timeout: timedelta) -> dist.Store:
    """Reach the job's store and wait until every rank has, naming the ranks that never do.

    The store is where torch's env:// and tcp:// rendezvous would put it: the launcher's
    agent (torchrun, `pyddl run`) serves it when it says so, otherwise rank 0 does. torch's
    own wait counts the clients that connected ("1/2 clients joined"); here each rank leaves
    its name under its number, rank 0 waits for all of them and writes its verdict (who is
    missing), and the others read it: one error, the same on every rank that came.
    """
    where = f"{job.master_addr}:{job.master_port}"
    agent = job.source == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    serves = "the launcher's agent" if agent else "rank 0"
    try:
        store = dist.TCPStore(job.master_addr, job.master_port, job.world_size, is_master=job.rank == 0 and not agent,
                              timeout=timeout, wait_for_workers=False, multi_tenant=not agent)
    except dist.DistNetworkError as err:
        raise CollectiveTimeoutError(
            f"pyddl.init: rank {job.rank} could not reach the job's rendezvous at {where}, which "
            f"{serves} serves ({job.source}): {str(err).splitlines()[0]}. It has not started, has "
            "failed (see its output), or the address is wrong: check MASTER_ADDR:MASTER_PORT on every rank.",
            missing_ranks=() if agent else (0,),
        ) from None

    def key(name) -> str:  # every attempt gets a new store (torch's agent makes one per round)
        return f"pyddl/join/{name}"

    ranks = range(job.world_size)

    def absent() -> list[int]:
        return [r for r in ranks if not store.check([key(r)])]

    store.set(key(job.rank), _env.host_identity())
    if job.rank == 0:
        try:
            store.wait([key(r) for r in ranks], timeout)
            missing = []
        except dist.DistStoreError:
            missing = absent()
        store.set(key("missing"), ",".join(map(str, missing)))
        if missing:  # the store may be this process's: serve the verdict before leaving
            try:
                store.wait([key(f"read{r}") for r in ranks if r and r not in missing], timedelta(seconds=_JOIN_GRACE_S))
            except dist.DistStoreError:
                pass
    else:
        store.set_timeout(timeout + timedelta(seconds=_JOIN_GRACE_S))
        try:
            verdict = store.get(key("missing")).decode()
            missing = [int(r) for r in verdict.split(",")] if verdict else []
        except dist.DistStoreError:  # rank 0 gave no verdict: judge from what the store holds
            missing = absent()
        except dist.DistNetworkError as err:
            raise CollectiveTimeoutError(
                f"pyddl.init: rank {job.rank} lost the job's rendezvous at {where} ({str(err).splitlines()[0]}): "
                "rank 0, which serves it, has failed or left; see its output.",
                missing_ranks=(0,),
            ) from None
        store.set_timeout(timeout)
        if missing:
            store.set(key(f"read{job.rank}"), "")
    if missing:
        raise CollectiveTimeoutError(
            f"pyddl.init: rank {job.rank} waited {timeout.total_seconds():g} s for the other ranks of a "
            f"{job.world_size}-rank job ({job.source}) to join; rank(s) {_ranks(missing)} never did. Ranks "
            "that never call pyddl.init() were not started, failed before it (see their output), or belong "
            f"to another job: check WORLD_SIZE and MASTER_ADDR:MASTER_PORT ({where}) on every rank.",
            missing_ranks=tuple(missing),
        )
    return store


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:16])) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def init(
    topology: str | None = None,
    allreduce: str | None = None,
    timeout_s: float | None = None,
    chunk_bytes: int | None = None,
    backend: str | None = None,
) -> None:
    """Join the job described by the environment; calling it again does nothing.

    Args:
        topology: dims innermost first, e.g. "4x2"; default: ranks grouped by server.
        allreduce: "native", "multiring" or "auto" (default: PYDDL_ALLREDUCE or native).
        timeout_s: how long any collective may wait before failing (default 300 s).
        chunk_bytes: pipelining chunk of the multiring allreduce (default 2 MiB).
        backend: "gloo" or "nccl" (default: NCCL when CUDA is available, else Gloo).

    Raises:
        ValueError: a bad setting, or a topology that does not fit the world size.

    Example:
        >>> import pyddl, torch
        >>> pyddl.init()
        >>> pyddl.allreduce(torch.ones(3))  # the number of ranks, thrice
    """
    global _state
    with _init_lock:
        if _state is not None:
            return
        settings = _resolve_settings(allreduce, timeout_s, chunk_bytes)
        job = _env.read_job_env()
        timeout = timedelta(seconds=settings.timeout_s)
        owns_world = not dist.is_initialized()
        if owns_world:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if job.source == "single":
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            else:
                store = _join(job, timeout)
                dist.init_process_group(backend, store=store, rank=job.rank, world_size=job.world_size, timeout=timeout)
        backend = dist.get_backend()
        world = dist.group.WORLD
        my_rank, world_size = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(job.local_rank)
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        topo = _detect_topology(job, topology, world)
        levels = _make_levels(topo, my_rank, timeout)
        store = dist.distributed_c10d._get_default_store() if world_size > 1 else None
        _state = _State(
            job=job,
            backend=backend,
            device=device,
            topology=topo,
            settings=settings,
            levels=levels,
            world=world,
            engine=Engine(wait_limit_s=settings.timeout_s * 2 + 60),
            monitor=Monitor(store, my_rank, world_size, settings.timeout_s, settings.stall_warn_s),
            owns_world=owns_world,
            timeline=Timeline(os.environ.get(TIMELINE_ENV), my_rank, world_size),
        )
    if settings.allreduce == "auto":
        ensure_tuned()


def ensure_tuned() -> None:
    """Time the `auto` candidates once (collective: every rank must reach it in the same order)."""
    st = _get()
    with _tune_lock:
        if st.tuned is None and dist.get_world_size() > 1:
            from pyddl.comm.auto import tune

            st.tuned = tune()


def shutdown() -> None:
    """Leave the job: stop pyddl's threads and destroy the process groups pyddl created."""
    global _state
    with _init_lock:
        state, _state = _state, None
    if state is None:
        return
    if state.timeline.enabled and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier(group=state.world)  # every rank's file is complete before the merge
        except RuntimeError:
            pass  # a rank is gone: merge what is there
    state.timeline.close(merge=dist.get_rank() == 0 if dist.is_initialized() else True)
    state.engine.close()
    state.monitor.close()
    if state.owns_world and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return _state is not None


def _get() -> _State:
    if _state is None:
        raise NotInitializedError(
            "pyddl is not initialized: call pyddl.init() first (it reads the environment "
            "that `pyddl run`, torchrun, srun or mpirun set)"
        )
    return _state


def rank() -> int:
    """This process's rank in the job, 0..size()-1."""
    _get()
    return dist.get_rank()


def size() -> int:
    """The number of processes in the job."""
    _get()
    return dist.get_world_size()


def local_rank() -> int:
    """This process's index inside its server (the innermost dim)."""
    st = _get()
    return st.topology.coords(dist.get_rank())[0]


def local_size() -> int:
    """The number of processes on this server (the innermost dim)."""
    return _get().topology.dims[0]


def cross_rank() -> int:
    """The index of this process's server (ranks with the same local_rank, across servers)."""
    st = _get()
    return dist.get_rank() // st.topology.dims[0]


def cross_size() -> int:
    """The number of servers."""
    st = _get()
    return st.topology.size // st.topology.dims[0]


def topology() -> Topology:
    """The job's topology (dims innermost first)."""
    return _get().topology


def settings() -> Settings:
    return _get().settings


def device() -> torch.device:
    """The device collectives run on (the local GPU under NCCL, else the CPU)."""
    return _get().device


def timeline() -> Timeline:
    """This rank's timeline recorder (disabled unless PYDDL_TIMELINE is set)."""
    return _get().timeline


def resync_seq(seq: int) -> None:
    """Set the collective counter after join(), which the ranks left at different numbers."""
    st = _get()
    with st.lock:
        st.seq = max(st.seq, seq)


def world_group():
    """The process group of all ranks (for adapters that issue their own collectives
    through `run_collective`)."""
    return _get().world


def run_collective(info: OpInfo, fn: Callable[[int], Any], asynchronous: bool = False, checked: bool = True) -> Any:
    """Run `fn(seq)` on the engine as world collective #seq, checked and guarded.

    Returns fn's result, or a Handle when `asynchronous`. `checked=False` skips the cross-rank
    call comparison (for join(), whose loop does its own).
    """
    st = _get()
    with st.lock:
        st.seq += 1
        seq = st.seq
    world_ranks = list(range(dist.get_world_size()))

    def job():
        st.monitor.enter(seq, info)
        start = st.timeline.now_us() if st.timeline.enabled else 0.0
        try:
            if checked and st.settings.check and len(world_ranks) > 1:
                exchange(info, seq, st.world, world_ranks, st.device, dist.get_rank())
            result = fn(seq)
            st.monitor.leave()
            if st.timeline.enabled:
                st.timeline.span(info.name, start, st.timeline.now_us(), "comm", {"seq": seq, "call": info.detail[:200]})
            return result
        except PyddlError:
            raise
        except RuntimeError as exc:  # Gloo/NCCL timeouts and lost connections
            raise st.monitor.diagnose(seq, info, world_ranks, exc) from exc

    describe = f"{info} (collective #{seq})"
    if asynchronous:
        return st.engine.submit(job, describe)
    return st.engine.run(job, describe)

