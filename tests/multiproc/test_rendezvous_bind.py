"""The store rank 0 hosts under srun and mpirun (and torchrun without its agent's store) listens
on MASTER_ADDR only: torch's own server listens on every interface, unauthenticated."""

import shutil
import subprocess

import pytest
import torch

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(90)]


_SCHEDULERS = {
    "openmpi": lambda rank, world: {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": world,
                                    "OMPI_COMM_WORLD_LOCAL_RANK": rank, "OMPI_COMM_WORLD_LOCAL_SIZE": world},
    "slurm": lambda rank, world: {"SLURM_PROCID": rank, "SLURM_NTASKS": world, "SLURM_LOCALID": rank,
                                  "SLURM_NODEID": 0, "SLURM_TASKS_PER_NODE": world, "SLURM_JOB_NODELIST": "localhost"},
}


def _listeners(rank, world, scheduler):
    import os

    import pyddl

    # As srun or mpirun start a rank: their variables, not torchrun's (which the harness sets).
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key)
    os.environ.update({k: str(v) for k, v in _SCHEDULERS[scheduler](rank, world).items()})
    pyddl.init(timeout_s=30)
    from pyddl.runtime import job

    source = job().source
    port = os.environ["MASTER_PORT"]
    seen = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.split("\n")
    total = pyddl.allreduce(torch.tensor([1])).item()  # the job works on the bound store
    pyddl.shutdown()
    return [line.split()[3] for line in seen if line.strip()], total, source


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list listening sockets")
@pytest.mark.parametrize("scheduler", sorted(_SCHEDULERS))
def test_rank_0_store_listens_on_master_addr_only(scheduler):
    for rank, (addresses, total, source) in enumerate(run_ranks(_listeners, 2, scheduler, timeout=80)):
        assert (total, source) == (2, scheduler)
        if rank == 0:
            assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses


@pytest.mark.parametrize("where", ["not this machine's address", "port taken by another program"])
def test_rank_0_that_cannot_host_the_store_says_so_in_one_line(where):
    from datetime import timedelta

    import pyddl
    from pyddl.env import JobEnv
    from pyddl.listen import listen_socket
    from pyddl.runtime import _join

    other = listen_socket("127.0.0.1", 0)  # another program's socket
    addr, port = ("192.0.2.1", 29500) if where.startswith("not") else other.getsockname()
    job = JobEnv(rank=0, world_size=2, local_rank=0, local_size=2, node_rank=0, master_addr=addr,
                 master_port=port, source="slurm")
    with pytest.raises(pyddl.PyddlError) as err:
        _join(job, timedelta(seconds=5))
    other.close()
    assert f"rank 0 cannot host the job's rendezvous on {addr}:{port} (slurm)" in str(err.value)
    assert "\n" not in str(err.value)
