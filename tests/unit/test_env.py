"""The launcher contract, parsed from environments recorded from torchrun, SLURM and mpirun."""

import pytest

from pyddl.env import expand_slurm_nodelist, read_job_env

TORCHRUN = {  # torchrun --nnodes 2 --nproc-per-node 4, second node, third worker
    "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1", "ROLE_RANK": "6", "MASTER_ADDR": "node1", "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "job",
}
SLURM = {  # srun -N 2 --ntasks-per-node 4 on gpu[07-08], task 5
    "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
}


def test_torchrun():
    job = read_job_env(TORCHRUN)
    assert (job.rank, job.world_size, job.local_rank, job.local_size, job.node_rank) == (6, 8, 2, 4, 1)
    assert (job.master_addr, job.master_port, job.source) == ("node1", 29400, "torchrun")


def test_slurm():
    job = read_job_env(SLURM)
    assert (job.rank, job.world_size, job.local_rank, job.local_size, job.node_rank) == (5, 8, 1, 4, 1)
    assert job.master_addr == "gpu07" and job.source == "slurm"
    assert 15000 <= job.master_port < 35000
    assert read_job_env({**SLURM, "MASTER_PORT": "1234"}).master_port == 1234


def test_slurm_uneven_tasks_per_node():
    job = read_job_env({**SLURM, "SLURM_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "2"})
    assert job.local_size == 2


def test_openmpi():
    job = read_job_env(OPENMPI)
    assert (job.rank, job.world_size, job.local_rank, job.local_size) == (3, 4, 1, 2)
    assert job.node_rank is None  # grouped by host name at init
    assert job.master_addr == "10.0.0.1"


def test_openmpi_without_master_addr_says_how():
    env = {k: v for k, v in OPENMPI.items() if k != "MASTER_ADDR"}
    with pytest.raises(ValueError, match="mpirun -x MASTER_ADDR"):
        read_job_env(env)


def test_torchrun_wins_over_slurm():
    assert read_job_env({**SLURM, **TORCHRUN}).source == "torchrun"


def test_single_process():
    job = read_job_env({})
    assert (job.rank, job.world_size, job.source) == (0, 1, "single")


def test_malformed_variable():
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        read_job_env({**TORCHRUN, "RANK": "x"})


def test_expand_nodelist():
    assert expand_slurm_nodelist("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]
    assert expand_slurm_nodelist("a1,b2") == ["a1", "b2"]
