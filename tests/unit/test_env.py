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


SRUN_STEP = {  # `srun -N 2 -n 4` inside a 4-node, 16-task sbatch allocation on n[01-04]; task 3
    "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "77",
    "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NUM_NODES": "4",
    "SLURM_JOB_NODELIST": "n[01-04]", "SLURM_NODELIST": "n[01-04]", "SLURM_STEP_NODELIST": "n[03-04]",
    "SLURM_TASKS_PER_NODE": "4(x4)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_slurm_step_wins_over_the_allocation():
    job = read_job_env(SRUN_STEP)
    # The step's nodes and counts, not the allocation's: rank 0 of this step runs on n03.
    assert (job.rank, job.world_size, job.local_rank, job.local_size, job.node_rank) == (3, 4, 1, 2, 1)
    assert job.master_addr == "n03"
    # Two steps of one job get different ports.
    assert job.master_port != read_job_env({**SRUN_STEP, "SLURM_STEP_ID": "1"}).master_port
    assert read_job_env({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "8"}).world_size == 8


def test_mpich_hydra():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "10.0.0.1", "PMI_FD": "5"}
    job = read_job_env(env)
    assert (job.rank, job.world_size, job.local_rank, job.local_size, job.source) == (2, 4, 0, 2, "mpich")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        read_job_env({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_pmix_only_says_what_is_missing():
    with pytest.raises(ValueError, match="PMIX_RANK=1 is set but no world size"):
        read_job_env({"PMIX_RANK": "1", "PMIX_NAMESPACE": "prterun-x-1"})
    # Open MPI 5 sets PMIX_RANK too, with its own OMPI_COMM_WORLD_* view: that one is read.
    assert read_job_env({**OPENMPI, "PMIX_RANK": "3"}).source == "openmpi"


def test_restart_count_from_either_launcher():
    assert read_job_env(TORCHRUN).restart_count == 0
    assert read_job_env({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"}).restart_count == 2
    # pyddl run -H restarts every server's agent, whose own count starts again at 0.
    assert read_job_env({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "0", "PYDDL_RESTART_COUNT": "1"}).restart_count == 1
    assert read_job_env({**SLURM, "SLURM_RESTART_COUNT": "1"}).restart_count == 1


def test_scheduler_mode_of_pyddl_run():
    from pyddl.cli.run import scheduler_mode

    assert scheduler_mode(SRUN_STEP) == "rank"
    assert scheduler_mode(OPENMPI) == "rank"
    assert scheduler_mode({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "rank"
    # An sbatch script or salloc shell: an allocation but no step yet.
    assert scheduler_mode({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}) == "allocation"
    assert scheduler_mode({**SRUN_STEP, **TORCHRUN}) is None  # torchrun inside srun: already a worker
    assert scheduler_mode({}) is None
