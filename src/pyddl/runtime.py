"""Joining the job: `init()` / `shutdown()`, and the job's default (world) communicator.

`init()` reads the launcher's environment (see pyddl.env) and the settings (pyddl.config),
creates the world process group (NCCL when CUDA is present, else Gloo) unless the user already
did, derives the topology, and makes the world's `Communicator`, which owns one process group
per slice of each dim. This module holds the one piece of process-wide state, the default
communicator that pyddl's module-level functions (pyddl.api) use; nothing below it reads it.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pyddl import env as _env
from pyddl.comm.communicator import Communicator, world_communicator
from pyddl.errors import CollectiveTimeoutError, NotInitializedError, PyddlError
from pyddl.listen import listen_socket
from pyddl.config import PYDDL_TIMELINE, Settings
from pyddl.timeline import Timeline
from pyddl.topology.spec import Topology, parse_topology, servers_from_keys

__all__ = ["init", "shutdown", "is_initialized", "world", "job"]


@dataclass
class _State:
    job: _env.JobEnv
    world: Communicator
    owns_world: bool


_state: _State | None = None
_init_lock = threading.Lock()


def _detect_topology(job: _env.JobEnv, spec: str | None, world) -> Topology:
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
    hosts = job.rank == 0 and not agent
    listener = None
    if hosts:
        # Listen on MASTER_ADDR only: torch's own server would take every interface. A port
        # this process already serves (an earlier join: torch keeps one server per port, the
        # multi-tenant store) is joined as it is.
        try:
            listener = listen_socket(job.master_addr, job.master_port)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise _cannot_host(job, where, err.strerror) from None
    try:
        store = dist.TCPStore(job.master_addr, job.master_port, job.world_size, is_master=hosts, timeout=timeout,
                              wait_for_workers=False, multi_tenant=not agent,
                              master_listen_fd=listener.fileno() if listener else None)
    except dist.DistNetworkError as err:
        if listener is not None:
            listener.close()
        if hosts:
            raise _cannot_host(job, where, str(err).splitlines()[0]) from None
        raise CollectiveTimeoutError(
            f"pyddl.init: rank {job.rank} could not reach the job's rendezvous at {where}, which "
            f"{serves} serves ({job.source}): {str(err).splitlines()[0]}. It has not started, has "
            "failed (see its output), or the address is wrong: check MASTER_ADDR:MASTER_PORT on every rank.",
            missing_ranks=() if agent else (0,),
        ) from None
    if listener is not None:
        listener.detach()  # the store's server owns the socket now and closes it when it stops
    # A process that joins again after shutdown() (Horovod's tests do, once per test) finds the
    # same store, with the last job's keys in it: every rank counts its own joins there, and
    # the n-th join of every rank uses keys of its own (torch's agent makes a new store per
    # restart, where the count starts again at 1).
    store = dist.PrefixStore(f"pyddl/{store.add(f'pyddl/joins/{job.rank}', 1)}", store)

    def key(name) -> str:
        return f"join/{name}"

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


def _cannot_host(job: _env.JobEnv, where: str, why: str) -> PyddlError:
    return PyddlError(
        f"pyddl.init: rank 0 cannot host the job's rendezvous on {where} ({job.source}): {why}. "
        "MASTER_ADDR must be an address of rank 0's server and MASTER_PORT a port free on it."
    )


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:16])) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def init(
    topology: str | None = None,
    allreduce: str | None = None,
    timeout_s: float | None = None,
    chunk_bytes: int | None = None,
    backend: str | None = None,
    compression: str | None = None,
) -> None:
    """Join the job described by the environment; calling it again does nothing.

    Settings not given here come from the environment (`pyddl run` flags, PYDDL_* variables),
    else from their defaults (pyddl.config.Settings).

    Args:
        topology: dims innermost first, e.g. "4x2"; default: ranks grouped by server.
        allreduce: "native", "multiring" or "auto" (default: PYDDL_ALLREDUCE or native).
        timeout_s: how long any collective may wait before failing (default 300 s).
        chunk_bytes: pipelining chunk of the multiring allreduce (default 2 MiB).
        backend: "gloo" or "nccl" (default: NCCL when CUDA is available, else Gloo).
        compression: the wire codec of calls that name none: "none", "fp16" or "bf16".

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
        settings = Settings.from_env(topology=topology, allreduce=allreduce, timeout_s=timeout_s,
                                     chunk_bytes=chunk_bytes, compression=compression)
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
        if dist.get_backend() == "nccl":
            torch.cuda.set_device(job.local_rank)
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        topo = _detect_topology(job, settings.topology, dist.group.WORLD)
        store = dist.distributed_c10d._get_default_store() if dist.get_world_size() > 1 else None
        timeline = Timeline(os.environ.get(PYDDL_TIMELINE), dist.get_rank(), dist.get_world_size())
        _state = _State(job=job, world=world_communicator(topo, settings, device, store, timeline),
                        owns_world=owns_world)
        # Leave the job before the interpreter tears down: torch's process groups destroyed at
        # exit with pyddl's threads still running aborted the process ("terminate called
        # without an active exception", SIGABRT) instead of returning the script's exit code.
        atexit.register(shutdown)
    if settings.allreduce == "auto":
        _state.world.ensure_tuned()


def shutdown() -> None:
    """Leave the job: stop pyddl's threads and destroy the process groups pyddl created."""
    global _state
    with _init_lock:
        state, _state = _state, None
    if state is None:
        return
    atexit.unregister(shutdown)
    timeline = state.world.timeline
    timeline.close()
    if timeline.enabled and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier(group=state.world.group)  # every rank's file is complete before the merge
        except RuntimeError:
            pass  # a rank is gone: merge what is there
    if not dist.is_initialized() or dist.get_rank() == 0:
        timeline.merge()
    state.world.close()
    if state.owns_world and dist.is_initialized():
        dist.destroy_process_group()



def is_initialized() -> bool:
    return _state is not None


def world() -> Communicator:
    """The job's default communicator: every rank, the job's topology and settings.

    Raises:
        NotInitializedError: before `pyddl.init()`.
    """
    if _state is None:
        raise NotInitializedError(
            "pyddl is not initialized: call pyddl.init() first (it reads the environment "
            "that `pyddl run`, torchrun, srun or mpirun set)"
        )
    return _state.world


def job() -> _env.JobEnv:
    """How the launcher described this process (rank, world size, restarts, ...)."""
    world()
    return _state.job
