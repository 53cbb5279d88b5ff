"""Several communicators in one job: the world and subsets of its ranks, each with its own
topology, groups, engine and sequence numbers, used alternately and concurrently; closed-form
results on every one, clear errors for non-members, and nothing left behind when destroyed."""

import pytest
import torch

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]


def _two_communicators(rank, world):
    import pyddl

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=65536)
    cross = pyddl.new_communicator([0, 2])  # one rank on each of the 2 servers: a cross-server ring
    server = pyddl.new_communicator([2, 3], topology="2")  # the second server's ranks
    out = {"cross": (cross.topology.dims, cross.is_member), "server": (server.topology.dims, server.is_member)}
    failures = []
    for alg in ("native", "multiring", "auto"):
        for n in (0, 5, 40011):  # 40011 floats: pipelined in 3 chunks of 64 KiB
            # Alternate: an async world call, a subset call, then the world's result.
            h = pyddl.allreduce_async(torch.full((n,), rank + 1.0), algorithm=alg)
            if cross.is_member:
                got = cross.allreduce(torch.full((n,), rank + 1.0), algorithm=alg)
                if not torch.all(got == 1 + 3):
                    failures.append(f"cross {alg} n={n}: {got[:3].tolist()}")
            if server.is_member:
                hs = server.allreduce_async(torch.full((n,), rank * 10.0), op="average", algorithm=alg)
            if not torch.all(h.wait() == 10):
                failures.append(f"world {alg} n={n}")
            if server.is_member and not torch.all(hs.wait() == 25):
                failures.append(f"server {alg} n={n}")
    if cross.is_member:
        rows, received = cross.alltoall(torch.tensor([10 * rank, 10 * rank + 1]))
        out["cross_ops"] = (
            cross.broadcast(torch.tensor([rank]), root=1).tolist(),
            cross.allgather(torch.full((1 + rank // 2, 2), rank)).tolist(),
            cross.reduce_scatter(torch.arange(4.0).reshape(2, 2) * (rank + 1)).tolist(),
            (rows.tolist(), received),
            cross.rank, cross.size, cross.local_size, cross.cross_size, cross.cross_rank,
        )
        out["cross_grouped"] = [t.tolist() for t in cross.grouped_allreduce([torch.ones(2) * rank, torch.ones(3, dtype=torch.int64)])]
    else:
        try:
            cross.allreduce(torch.ones(1))
        except pyddl.NotMemberError as err:
            out["not_member"] = str(err)
    # A subset by split: even and odd ranks.
    parity = pyddl.world().split(rank % 2)
    out["split"] = (list(parity.ranks), parity.allreduce(torch.tensor([rank])).item())
    # The world's sequence numbers were not disturbed by the subsets' collectives.
    out["world_after"] = pyddl.allreduce(torch.tensor([1])).item()
    for comm in (cross, server, parity):
        comm.destroy()
    try:
        server.allreduce(torch.ones(1))
    except pyddl.PyddlError as err:
        out["destroyed"] = str(err)
    pyddl.shutdown()
    out["failures"] = failures
    return out


def test_world_and_subsets_alternate_and_overlap_with_closed_form_results():
    results = run_ranks(_two_communicators, 4, timeout=140)
    for rank, out in enumerate(results):
        assert out["failures"] == [], f"rank {rank}: {out['failures']}"
        assert out["cross"] == ((1, 2), rank in (0, 2))
        assert out["server"] == ((2,), rank in (2, 3))
        assert out["split"] == (([0, 2], 2) if rank % 2 == 0 else ([1, 3], 4))
        assert out["world_after"] == 4
        assert "destroyed" in out["destroyed"]
        if rank in (0, 2):
            me = rank // 2
            bcast, gathered, scattered, (a2a, received), *where = out["cross_ops"]
            assert bcast == [2]  # communicator rank 1 is job rank 2
            assert gathered == [[0, 0]] + [[2, 2]] * 2
            assert scattered == [[8.0 * me, 8.0 * me + 4]]  # row me of arange(4).reshape(2, 2) x (1 + 3)
            assert a2a == [me, 20 + me] and received == [1, 1]
            assert where == [me, 2, 1, 2, me]
            assert out["cross_grouped"] == [[2.0, 2.0], [2, 2, 2]]
        else:
            assert "rank %d is not a member of communicator" % rank in out["not_member"]
            assert "ranks 0,2" in out["not_member"]


def _create_and_destroy(rank, world):
    import os

    import torch.distributed as dist

    import pyddl

    pyddl.init(topology="2x2", timeout_s=60)
    pyddl.new_communicator([0, 1, 2, 3]).destroy()  # warm-up: whatever torch keeps once
    threads, groups = len(os.listdir("/proc/self/task")), len(dist.distributed_c10d._world.pg_map)
    sums = []
    for k in range(50):
        ranks = [0, 1] if k % 2 else [1, 2, 3]
        comm = pyddl.new_communicator(ranks)
        if comm.is_member:
            sums.append(comm.allreduce(torch.tensor([rank + 1]), algorithm="multiring").item())
        comm.destroy()
    leaked = (len(os.listdir("/proc/self/task")) - threads, len(dist.distributed_c10d._world.pg_map) - groups)
    pyddl.shutdown()
    return sums, leaked


def test_fifty_communicators_created_and_destroyed_leak_no_threads_or_groups():
    for rank, (sums, leaked) in enumerate(run_ranks(_create_and_destroy, 4, timeout=140)):
        expected = [3 if k % 2 else 9 for k in range(50) if rank in ([0, 1] if k % 2 else [1, 2, 3])]
        assert sums == expected
        assert leaked == (0, 0), f"rank {rank} kept (threads, process groups) {leaked}"


def _mismatched_creation(rank, world):
    import pyddl

    pyddl.init(timeout_s=30)
    try:
        pyddl.new_communicator([0] if rank == 0 else [0, 1])
    except pyddl.CollectiveMismatchError as err:
        return str(err)
    finally:
        pyddl.shutdown()
    return "no error"


def test_ranks_that_ask_for_different_communicators_get_a_mismatch_error_not_a_hang():
    for text in run_ranks(_mismatched_creation, 2, timeout=60):
        assert "new_communicator(ranks=[0] " in text and "new_communicator(ranks=[0, 1] " in text


def _bad_ranks(rank, world):
    import pyddl

    pyddl.init(timeout_s=30)
    errors = []
    for bad in ([], [0, 0], [0, 5], ["a"]):
        try:
            pyddl.new_communicator(bad)
        except (ValueError, TypeError) as err:
            errors.append(str(err))
    pyddl.shutdown()
    return errors


def test_bad_ranks_are_clear_errors_before_any_collective():
    for errors in run_ranks(_bad_ranks, 2, timeout=60):
        assert len(errors) == 4 and all("job ranks" in e for e in errors), errors



def _join_again(rank, world):
    import os

    import pyddl

    out, threads = [], []
    for i in range(3):  # Horovod's own tests init and shut down once per test, in one process
        pyddl.init(timeout_s=30)
        sub = pyddl.new_communicator([0, 1])
        out.append((pyddl.allreduce(torch.tensor([rank + i]), algorithm="multiring").item(),
                    sub.allreduce(torch.tensor([1])).item()))
        if i == 0:
            sub.destroy()  # later rounds leave it to shutdown, as a user who forgets would
        pyddl.shutdown()
        threads.append(len(os.listdir("/proc/self/task")))  # torch's C++ threads too
    return out, threads


def test_a_process_joins_again_after_shutdown_and_leaves_no_threads():
    # The second init used to hang in new_group: rank 0's store (torch's, shared within the
    # process) still held the last job's keys; each join now uses keys of its own.
    # Gloo's worker threads stop only when the last reference to their group goes: groups a
    # communicator kept past shutdown aborted the interpreter at exit about 1 run in 20.
    for rank, (out, threads) in enumerate(run_ranks(_join_again, 2, timeout=80)):
        assert threads[1:] == threads[:1] * 2, f"rank {rank}: OS threads after each shutdown {threads}"
        assert out == [(1 + 2 * i, 2) for i in range(3)]
