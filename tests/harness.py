"""Run a function on N Gloo ranks in fresh processes, as `pyddl run` would, and collect
each rank's return value or traceback. Every run has a deadline: a hang fails the test."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import random
import shutil
import socket
import tempfile
import threading
import time
import traceback

__all__ = ["free_port", "hold_engine", "run_ranks", "wait_for_ranks", "RankFailure"]

_DONE_DIR = "HARNESS_DONE_DIR"  # where each rank leaves a file once its function has returned


class RankFailure(AssertionError):
    pass


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range.

    A port from bind(("", 0)) is free only until released: the kernel may hand it to any
    connect() at once, and the Gloo jobs of the other pytest-xdist worker open many connections
    (a rank 0 then failed to host its store with EADDRINUSE). Ports below the ephemeral range
    are never handed out that way, so only another explicit pick can take this one.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lowest_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        lowest_ephemeral = 32768  # Linux's default
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(max(1024, lowest_ephemeral - 12000), lowest_ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below {lowest_ephemeral}")


def _child(fn, rank, world, env, args, queue):
    import torch

    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank % int(env.get("LOCAL_WORLD_SIZE", world))),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)  # torch was imported before OMP_NUM_THREADS was set (see _context)
    try:
        # Plain pickle: tensors sent through a multiprocessing queue would otherwise be shared-
        # memory handles that die with this process.
        result = (rank, True, pickle.dumps(fn(rank, world, *args)))
    except BaseException as exc:  # reported to the parent, which fails the test
        result = (rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    open(os.path.join(env[_DONE_DIR], str(rank)), "w").close()
    queue.put(result)
    # Rank 0 hosts the job's store: leaving before the others have returned would take it from
    # a rank still explaining a timeout ("the job's store is unreachable" instead of its culprit).
    wait_for_ranks(range(world), 60)


def hold_engine(comm) -> threading.Event:
    """Hold `comm`'s engine until the returned event is set, so the calls after it queue up."""
    from pyddl.comm.guard import OpInfo

    release = threading.Event()
    comm.run(OpInfo("hold", ""), lambda seq: release.wait(30), asynchronous=True, checked=False)
    return release


def wait_for_ranks(ranks, limit_s: float) -> None:
    """Stay here, alive, until the functions of `ranks` have returned (at most limit_s): for a
    rank that must miss a collective while the others time out on it. Sleeping a fixed time
    instead makes every such test as long as the sleep."""
    folder = os.environ[_DONE_DIR]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not all(os.path.exists(os.path.join(folder, str(r))) for r in ranks):
        time.sleep(0.05)


def _context():
    """Fresh processes forked from a server that imported torch once: each rank skips the 1.5 s
    import a spawned one pays (most of a short multi-process test, and 5 minutes of the suite),
    and the 2 s of torch._dynamo that the first optimizer, DDP or FSDP of a rank would import.
    jax too, where installed (its import starts no thread; its backend starts in the rank)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "jax", "harness"])
    return ctx


def run_ranks(fn, world: int, *args, env: dict | None = None, timeout: float = 90, expect_errors: bool = False):
    """Run fn(rank, world, *args) on `world` processes; return the list of results by rank.

    With expect_errors, a rank's exception text is returned in place of its result instead
    of failing the test.
    """
    ctx = _context()
    queue = ctx.Queue()
    done_dir = tempfile.mkdtemp(prefix="harness-")
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), _DONE_DIR: done_dir}
    base.update(env or {})
    procs = [ctx.Process(target=_child, args=(fn, r, world, base, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok and not expect_errors:
                raise RankFailure(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value) if ok else value
    except queue_mod.Empty:
        missing = sorted(set(range(world)) - set(results))
        raise RankFailure(f"ranks {missing} did not finish within {timeout} s") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        shutil.rmtree(done_dir, ignore_errors=True)
    return [results[r] for r in range(world)]
