"""Horovod's process sets on 3 Gloo ranks: each registered set is a pyddl Communicator over
its ranks, and `process_set=` runs a collective on that set alone (Horovod's meaning: only
the set's ranks take part, `root_rank` is a job rank, Average divides by the set's size)."""

import pytest
import torch
import torch.nn as nn

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]


def _sets(rank, world):
    import pyddl.torch as hvd

    even = hvd.ProcessSet([2, 0])  # Horovod sorts the ranks
    hvd.init(process_sets=[even])  # static, as in Horovod's test_process_sets_static
    upper = hvd.add_process_set([1, 2])  # dynamic: collective over every rank
    out = {"even": (even.ranks, even.size(), even.rank(), even.included()),
           "upper": (upper.size(), upper.rank(), upper.included()),
           "ids": (hvd.global_process_set.process_set_id, even.process_set_id != upper.process_set_id)}
    x = torch.tensor([rank + 1.0])
    if even.included():
        out["sum"] = hvd.allreduce(x, op=hvd.Sum, process_set=even).item()  # 1 + 3
        # Integer Average over the set's 2 ranks: (-40 + -35) / 2 = -37.5 truncates to -37.
        out["int_avg"] = hvd.allreduce(torch.tensor([-40 if rank == 0 else -35]), process_set=even).item()
        out["gather"] = hvd.allgather(torch.full((1,), rank), process_set=even).tolist()  # [0, 2]
        out["bcast"] = hvd.broadcast(torch.tensor([rank * 10]), root_rank=2, process_set=even).item()
        out["rs"] = hvd.reducescatter(torch.tensor([[1.0], [2.0]]) * (rank + 1), op=hvd.Sum,
                                      process_set=even).tolist()  # row r of [4, 8]
        out["a2a"] = hvd.alltoall(torch.tensor([rank, rank]), process_set=even).tolist()  # [0, 2]
        out["grouped"] = [t.tolist() for t in hvd.grouped_allreduce([x, x * 2], op=hvd.Sum, process_set=even)]
        out["object"] = hvd.broadcast_object({"from": rank}, root_rank=2, process_set=even)
        out["objects"] = hvd.allgather_object(rank, process_set=even)
        hvd.barrier(process_set=even)
        # DistributedOptimizer over the set: gradients averaged over ranks 0 and 2 only.
        p = nn.Parameter(torch.zeros(2))
        opt = hvd.DistributedOptimizer(torch.optim.SGD([p], lr=1.0), named_parameters=[("p", p)], process_set=even)
        (p.sum() * (rank + 1)).backward()
        opt.step()
        out["opt"] = p.tolist()  # - (1 + 3) / 2
    else:
        try:
            hvd.allreduce(x, process_set=even)
            out["outsider"] = "no error"
        except ValueError as err:  # pyddl's NotMemberError is a ValueError
            out["outsider"] = type(err).__name__
        # Horovod's test_optimizer_process_sets: outside the set, step() applies the local gradient.
        p = nn.Parameter(torch.zeros(2))
        opt = hvd.DistributedOptimizer(torch.optim.SGD([p], lr=1.0), named_parameters=[("p", p)], process_set=even)
        (p.sum() * (rank + 1)).backward()
        opt.step()
        out["opt"] = p.tolist()  # - 2, rank 1's own
    if upper.included():
        # root_rank counts in job ranks: rank 1 is the set's first.
        out["upper_bcast"] = hvd.broadcast(torch.tensor([rank]), root_rank=1, process_set=upper).item()
        try:
            hvd.broadcast(torch.tensor([rank]), root_rank=0, process_set=upper)
            out["bad_root"] = "no error"
        except ValueError as err:
            out["bad_root"] = str(err)
    # Horovod refuses a set with the ranks of a registered one, the global set's included.
    out["duplicates"] = []
    for ranks in ([2, 1], [0, 1, 2]):
        try:
            hvd.add_process_set(ranks)
        except ValueError as err:
            out["duplicates"].append(str(err))
    out["world"] = hvd.allreduce(x, op=hvd.Sum).item()  # the global set still works: 6
    out["removed"] = (hvd.remove_process_set(upper), hvd.remove_process_set(hvd.global_process_set))
    again = hvd.add_process_set([1, 2])  # its ranks are free again
    out["again"] = hvd.allreduce(x, op=hvd.Sum, process_set=again).item() if again.included() else None
    hvd.remove_process_set(again)
    try:
        hvd.allreduce(x, process_set=upper)
        out["after_remove"] = "no error"
    except ValueError as err:
        out["after_remove"] = str(err)
    hvd.shutdown()
    return out


def test_process_sets():
    results = run_ranks(_sets, 3, timeout=140)
    for rank, out in enumerate(results):
        member = rank in (0, 2)
        assert out["even"] == ([0, 2], 2, {0: 0, 1: -1, 2: 1}[rank], member)
        assert out["upper"] == (2, {0: -1, 1: 0, 2: 1}[rank], rank in (1, 2))
        assert out["ids"] == (0, True)
        if member:
            assert out["sum"] == 4.0 and out["int_avg"] == -37
            assert out["gather"] == [0, 2] and out["bcast"] == 20
            assert out["rs"] == ([[4.0]] if rank == 0 else [[8.0]])
            assert out["a2a"] == [0, 2]
            assert out["grouped"] == [[4.0], [8.0]]
            assert out["object"] == {"from": 2} and out["objects"] == [0, 2]
            assert out["opt"] == [-2.0, -2.0]
        else:
            assert out["outsider"] == "NotMemberError" and out["opt"] == [-2.0, -2.0]
        if rank in (1, 2):
            assert out["upper_bcast"] == 1
            assert out["bad_root"] == "broadcast root_rank 0 is not in the process set (ranks [1, 2])"
        assert out["world"] == 6.0
        assert out["duplicates"] == [
            "Attempted to add a duplicate process set: ProcessSet(process_set_id=None, ranks=[1, 2]) has the ranks "
            "of one registered already; use that one",
            "Attempted to add a duplicate process set: ProcessSet(process_set_id=None, ranks=[0, 1, 2]) has the "
            "ranks of one registered already; use that one"]
        assert out["again"] == (None if rank == 0 else 5.0)
        assert out["removed"] == (True, False)
        assert "is not registered" in out["after_remove"]
