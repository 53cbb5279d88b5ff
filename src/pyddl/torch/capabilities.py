"""Horovod's build and runtime queries (`hvd.nccl_built()`, `hvd.gloo_enabled()`...), answered
for pyddl on the installed torch.

"built" means the installed torch can use it; "enabled" means this job's collectives run over
it (pyddl.init picks NCCL when CUDA is available, else Gloo). pyddl never runs collectives over
MPI itself, but a job whose default group the user created with the MPI backend reports it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built",
    "ddl_built", "ccl_built", "cuda_built", "rocm_built",
]


def _backend() -> str:
    """The backend collectives run over now, or the one pyddl.init() would pick."""
    if dist.is_initialized():
        return str(dist.get_backend())
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def mpi_built() -> bool:
    """Whether the installed torch has the MPI backend."""
    return dist.is_mpi_available()


def mpi_enabled() -> bool:
    """Whether this job's collectives run over MPI (only if the user created an MPI group)."""
    return _backend() == "mpi"


def mpi_threads_supported() -> bool:
    """False: pyddl issues every collective from its one engine thread and never asks MPI for
    MPI_THREAD_MULTIPLE (torch's MPI backend only requires MPI_THREAD_SERIALIZED)."""
    return False


def gloo_built() -> bool:
    """Whether the installed torch has the Gloo backend."""
    return dist.is_gloo_available()


def gloo_enabled() -> bool:
    """Whether this job's collectives run (or, before init, would run) over Gloo."""
    return gloo_built() and _backend() == "gloo"


def nccl_built() -> int:
    """The NCCL_VERSION_CODE of the installed torch's NCCL (2.30.7 gives 23007), 0 without it.

    As Horovod's: an int, not a bool, since its tests compare it (`nccl_built() < 2700`). A CUDA
    build of torch has NCCL with or without a GPU.
    """
    if not dist.is_nccl_available():
        return 0
    major, minor, patch = torch.cuda.nccl.version()[:3]
    # NCCL's own NCCL_VERSION(X, Y, Z) macro (nccl.h): the code grew a digit at 2.9.
    return major * 1000 + minor * 100 + patch if major <= 2 and minor <= 8 else major * 10000 + minor * 100 + patch


def ddl_built() -> bool:
    """False: IBM's DDL library is not used; pyddl re-implements its multiring in Python."""
    return False


def ccl_built() -> bool:
    """False: pyddl does not use Intel's oneCCL."""
    return False


def cuda_built() -> bool:
    """Whether the installed torch was built with CUDA."""
    return torch.backends.cuda.is_built()


def rocm_built() -> bool:
    """Whether the installed torch was built with ROCm."""
    return torch.version.hip is not None
