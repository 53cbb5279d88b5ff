"""The launcher -> worker contract: every environment variable pyddl reads, in one place.

`pyddl run` sets torchrun's variables (it launches through torchrun's elastic agent) plus
pyddl's own `PYDDL_*` settings (declared in pyddl.config). `read_job_env()` also understands SLURM and Open MPI, so a
job started by `srun` or `mpirun` needs no flags. Pure: no process group is touched here.
"""

from __future__ import annotations

import os
import re
import socket
import zlib
from dataclasses import dataclass
from typing import Mapping

from pyddl.config import PYDDL_RESTART_COUNT

__all__ = [
    "JobEnv",
    "read_job_env",
    "expand_slurm_nodelist",
    "DEFAULT_MASTER_PORT",
    "host_identity",
]

DEFAULT_MASTER_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class JobEnv:
    """Who this process is in the job, as its launcher described it.

    `node_rank` is None when the launcher did not say which server this process is on;
    pyddl then groups ranks by host name. `restart_count` > 0 means the launcher restarted
    the job after a failure: a script resumes from its last checkpoint (docs/launch.md).
    """

    rank: int
    world_size: int
    local_rank: int
    local_size: int | None
    node_rank: int | None
    master_addr: str
    master_port: int
    source: str  # "torchrun" (also pyddl run), "slurm", "openmpi", "mpich" or "single"
    restart_count: int = 0


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _opt_int(env: Mapping[str, str], key: str) -> int | None:
    return _int(env, key) if key in env else None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[01-03,07],login1`` into host names.

    Example:
        >>> expand_slurm_nodelist("n[1-2],m")
        ['n1', 'n2', 'm']
    """
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def _slurm_tasks_per_node(spec: str) -> list[int]:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": four tasks on each of two nodes, then three.
    counts: list[int] = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts.extend([int(count)] * int(repeat or 1))
    return counts


def _master(env: Mapping[str, str], default_addr: str, default_port: int) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR", default_addr)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port
    return addr, port


def _first(env: Mapping[str, str], *keys: str) -> str | None:
    return next((k for k in keys if k in env), None)


def _restarts(env: Mapping[str, str], *keys: str) -> int:
    return sum(_int(env, k) for k in keys if k in env)


def _slurm(env: Mapping[str, str]) -> JobEnv:
    # srun exports the step's own view (SLURM_STEP_*): a step may use part of the allocation,
    # so the job-wide SLURM_NTASKS / SLURM_JOB_NODELIST can name tasks and nodes it does not have.
    node_id = _opt_int(env, "SLURM_NODEID")
    local_size = None
    per_node_key = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node_key and node_id is not None:
        per_node = _slurm_tasks_per_node(env[per_node_key])
        if node_id < len(per_node):
            local_size = per_node[node_id]
    nodes_key = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand_slurm_nodelist(env[nodes_key]) if nodes_key else []
    # A port derived from the job and step ids keeps two jobs (or steps) sharing a node apart.
    ident = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '')}"
    job_port = 15000 + zlib.crc32(ident.encode()) % 20000
    addr, port = _master(env, hosts[0] if hosts else "127.0.0.1", job_port)
    return JobEnv(
        rank=_int(env, "SLURM_PROCID"),
        world_size=_int(env, _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")),
        local_rank=_opt_int(env, "SLURM_LOCALID") or 0,
        local_size=local_size,
        node_rank=node_id,
        master_addr=addr,
        master_port=port,
        source="slurm",
        restart_count=_restarts(env, "SLURM_RESTART_COUNT"),
    )


def _mpi(env: Mapping[str, str], source: str, rank: str, size: str, local_rank: str, local_size: str) -> JobEnv:
    if "MASTER_ADDR" not in env:
        raise ValueError(
            "running under mpirun, but MASTER_ADDR is not set: pyddl needs the address of "
            "rank 0's host for its rendezvous; run e.g. "
            "`mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...`"
        )
    addr, port = _master(env, "", DEFAULT_MASTER_PORT)
    return JobEnv(
        rank=_int(env, rank),
        world_size=_int(env, size),
        local_rank=_opt_int(env, local_rank) or 0,
        local_size=_opt_int(env, local_size),
        # MPI exports no server index (Open MPI's NODE_RANK counts processes, not servers):
        # pyddl groups ranks by host name instead.
        node_rank=None,
        master_addr=addr,
        master_port=port,
        source=source,
        restart_count=_restarts(env, PYDDL_RESTART_COUNT),
    )


def read_job_env(env: Mapping[str, str] | None = None) -> JobEnv:
    """Describe this process's place in the job from its environment.

    Precedence: torchrun's variables (set by `pyddl run` and torchrun), then SLURM (the job
    step's SLURM_STEP_* before the allocation's), then Open MPI, then MPICH/Intel MPI (PMI_*);
    with none of them the job is a single process.

    Raises:
        ValueError: a variable is malformed, MASTER_ADDR is missing under mpirun, or only
            PMIx's rank is set (no world size to read).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        addr, port = _master(env, "127.0.0.1", DEFAULT_MASTER_PORT)
        return JobEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_opt_int(env, "LOCAL_RANK") or 0,
            local_size=_opt_int(env, "LOCAL_WORLD_SIZE"),
            node_rank=_opt_int(env, "GROUP_RANK") if "GROUP_RANK" in env else _opt_int(env, "NODE_RANK"),
            master_addr=addr,
            master_port=port,
            source="torchrun",
            restart_count=_restarts(env, "TORCHELASTIC_RESTART_COUNT", PYDDL_RESTART_COUNT),
        )
    if "SLURM_PROCID" in env and _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        return _slurm(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _mpi(env, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return _mpi(env, "mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    if "PMIX_RANK" in env:
        raise ValueError(
            f"PMIX_RANK={env['PMIX_RANK']} is set but no world size (PMIx keeps it out of the "
            "environment): start the job with Open MPI's mpirun (it exports OMPI_COMM_WORLD_*), "
            "srun, or pyddl run, or export RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    addr, port = _master(env, "127.0.0.1", 0)
    return JobEnv(0, 1, 0, 1, 0, addr, port, "single")


def host_identity() -> str:
    """Name this server for grouping ranks when the launcher did not say."""
    return socket.gethostname()
