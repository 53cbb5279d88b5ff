"""Named ops are matched by name, as in Horovod: its coordinator collects each rank's ready
names and runs a name once every rank has submitted it (horovod/common/controller.cc), so ranks
may submit named async ops in different orders. pyddl's ranks negotiate only when the check
finds them at different names (comm/names.py). Each test states Horovod's meaning it checks."""

import random
import time

import pytest
import torch

from harness import run_ranks, wait_for_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _value(rank, i):
    """Rank r's tensor for the i-th name: distinct per name, so a pairing by order shows."""
    return torch.full((i + 2,), float((rank + 1) * 10 ** i))


def _opposite_orders(rank, world, steps):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    names = ["a", "b", "c"]
    order = names if rank == 0 else names[::-1]
    sums, counts = [], []
    for step in range(steps):
        handles = {n: hvd.allreduce_async(_value(rank, names.index(n)), name=n, op=hvd.Sum) for n in order}
        for n in random.Random(rank * 100 + step).sample(names, 3):  # synchronize in any order
            sums.append((n, hvd.synchronize(handles[n]).tolist()))
        counts.append(pyddl.world().negotiations)
    return sorted(sums), counts


@pytest.mark.timeout(90)
def test_same_named_async_ops_in_opposite_orders():
    """Horovod: a named allreduce completes once every rank submitted that name, whatever the
    order; two ranks submitting a, b, c and c, b, a each get the right sum for every name.
    And a steady loop stops negotiating (Horovod's response cache): here from its third step,
    once the engine has seen which name follows which, across the loop's turn too."""
    steps = 5
    for sums, counts in run_ranks(_opposite_orders, 2, steps):
        for i, n in enumerate("abc"):
            want = [3.0 * 10 ** i] * (i + 2)  # ranks contribute 1 and 2 times 10^i
            assert [s for name, s in sums if name == n] == [want] * steps
        assert counts[0] >= 1  # the orders differed, so the ranks negotiated
        assert counts[-1] == counts[1], counts


def _mixed(rank, world):
    import pyddl.torch as hvd

    hvd.init()
    ops = {
        "gather": lambda: hvd.allgather_async(torch.full((rank + 1, 2), rank), name="x"),
        "bcast": lambda: hvd.broadcast_async(torch.full((3,), rank + 5), root_rank=world - 1, name="x"),
        "sum": lambda: hvd.allreduce_async(torch.tensor([rank + 1]), name="s", op=hvd.Sum),
        "grouped": lambda: hvd.grouped_allgather_async([torch.full((1,), rank), torch.full((2, 1), -rank)], name="g"),
    }
    order = random.Random(rank).sample(sorted(ops), len(ops))
    handles = {k: ops[k]() for k in order}
    out = {k: hvd.synchronize(handles[k]) for k in sorted(ops, reverse=rank % 2 == 1)}
    after = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed: order-matched
    return order, {k: (v.tolist() if isinstance(v, torch.Tensor) else [t.tolist() for t in v]) for k, v in out.items()}, after.item()


@pytest.mark.timeout(90)
def test_mixed_named_async_ops_in_shuffled_orders():
    """Horovod's names are per kind of op (an allgather and a broadcast may share one), and any
    mix of named async ops completes whatever each rank's order; unnamed ops after them still
    match by order."""
    world = 3
    results = run_ranks(_mixed, world)
    assert len({tuple(order) for order, _, _ in results}) > 1  # the ranks' orders did differ
    for _, out, after in results:
        assert out["gather"] == [[r, r] for r in range(world) for _ in range(r + 1)]
        assert out["bcast"] == [world + 4] * 3
        assert out["sum"] == [world * (world + 1) // 2]
        assert out["grouped"] == [list(range(world)), [[-r] for r in range(world) for _ in range(2)]]
        assert after == sum(range(world))


def _never_submitted(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    mine = ["a", "b"] if rank == 0 else ["b", "c"]
    handles = {n: hvd.allreduce_async(torch.ones(2), name=n, op=hvd.Sum) for n in mine}
    seen = {"b": hvd.synchronize(handles["b"]).tolist()}  # both have b: it runs first
    t0 = time.monotonic()
    try:
        hvd.synchronize(handles[mine[0] if rank == 0 else "c"])
        seen["lonely"] = "no error"
    except hvd.HorovodInternalError as err:
        seen["lonely"] = (type(err.__cause__).__name__, str(err), err.missing_ranks)
    seen["waited"] = time.monotonic() - t0
    try:
        pyddl.allreduce(torch.ones(1))
        seen["next"] = "no error"
    except pyddl.CollectiveError as err:
        seen["next"] = str(err)
    return seen


@pytest.mark.timeout(90)
def test_a_name_one_rank_never_submits_times_out_naming_rank_and_name():
    """Horovod stalls on a name some rank never submits (its stall inspector names the ranks
    that lack it); pyddl raises on every rank after the timeout, naming the rank and the name,
    and, as after any timeout, fails every later call."""
    for rank, seen in enumerate(run_ranks(_never_submitted, 2, env={"PYDDL_TIMEOUT": "3"})):
        assert seen["b"] == [2.0, 2.0]
        cause, text, missing = seen["lonely"]
        assert cause == "CollectiveTimeoutError", text
        assert "rank 1 lacks 'allreduce.a'" in text and "rank 0 lacks 'allreduce.c'" in text
        assert missing == (0, 1)
        assert 2 < seen["waited"] < 30
        assert "an earlier collective failed" in seen["next"]


def _idle_peer(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    hvd.allreduce(torch.ones(1), name="first")
    if rank == 1:
        wait_for_ranks([0], 30)  # submits nothing while rank 0 waits (its timeout is 3 s)
        return "slept"
    try:
        hvd.synchronize(hvd.allreduce_async(torch.ones(1), name="lonely"))
    except hvd.HorovodInternalError as err:
        return str(err)
    return "no error"


@pytest.mark.timeout(90)
def test_a_name_a_rank_never_submits_while_it_is_idle_names_both():
    """The same with the other rank idle, not negotiating: the collective times out, and the
    error names the name and the rank that never came."""
    text, slept = run_ranks(_idle_peer, 2, env={"PYDDL_TIMEOUT": "3"})
    assert slept == "slept"
    assert "name='allreduce.lonely'" in text and "timed out after 3 s" in text and "rank 1" in text


def _same_name_other_shapes(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    seen = []
    # The same name with different shapes, behind another name in the other order.
    x = torch.ones(4 if rank == 0 else 5)
    pairs = [("x", x), ("y", torch.tensor([rank + 1.0]))]
    handles = {n: hvd.allreduce_async(t, name=n, op=hvd.Sum) for n, t in (pairs if rank == 0 else pairs[::-1])}
    try:
        hvd.synchronize(handles["x"])
        seen.append("no error")
    except hvd.HorovodInternalError as err:
        mismatch = isinstance(err.__cause__, pyddl.CollectiveMismatchError)
        seen.append("mismatch" if mismatch and "float32[4]" in str(err) and "float32[5]" in str(err) else str(err))
    seen.append(hvd.synchronize(handles["y"]).item())  # 1 + 2
    # A named op against an unnamed one: they can never match.
    try:
        hvd.allreduce(torch.ones(2), name="a" if rank == 0 else None)
        seen.append("no error")
    except hvd.HorovodInternalError as err:
        mismatch = isinstance(err.__cause__, pyddl.CollectiveMismatchError)
        seen.append("mismatch" if mismatch and "name='allreduce.a'" in str(err) else str(err))
    seen.append(hvd.allreduce(torch.tensor([rank + 1.0]), name="z", op=hvd.Sum).item())
    return seen


@pytest.mark.timeout(90)
def test_same_name_different_shapes_and_named_vs_unnamed_raise_on_every_rank():
    """Horovod: one name with different shapes on two ranks is an error on every rank
    ("Mismatched allreduce tensor shapes"), and the job goes on. pyddl also raises on every
    rank for a named op against an unnamed one (Horovod would stall), and the job goes on."""
    for seen in run_ranks(_same_name_other_shapes, 2):
        assert seen == ["mismatch", 3.0, "mismatch", 3.0]


def _duplicate(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    seen = []
    h = hvd.allreduce_async(torch.tensor([rank + 1.0]), name="d", op=hvd.Sum)
    if rank == 0:
        try:
            hvd.allreduce_async(torch.ones(1), name="d")
            seen.append("no error")
        except ValueError as err:
            seen.append("in flight" if "'d' is still in flight" in str(err) else str(err))
        # The core API refuses it too, for the time the collective is queued or running.
        comm = pyddl.world()
        blocker = comm.allreduce_async(torch.ones(1), name="core")
        try:
            comm.allreduce_async(torch.ones(1), name="core")
            seen.append("no error")
        except ValueError as err:
            seen.append("core in flight" if "'allreduce.core' is still in flight" in str(err) else str(err))
    else:
        blocker = pyddl.world().allreduce_async(torch.ones(1), name="core")
    seen.append(hvd.synchronize(h).item())
    seen.append(blocker.wait().item())
    return seen


@pytest.mark.timeout(90)
def test_a_name_in_flight_twice_is_an_error_on_that_rank_only():
    """Horovod: submitting a name again before the first completed is an error on that rank
    (DUPLICATE_NAME_ERROR); the other ranks and the first op are unaffected."""
    first, second = run_ranks(_duplicate, 2)
    assert first == ["in flight", "core in flight", 3.0, 2.0]
    assert second == [3.0, 2.0]


def _joined_rank(rank, world):
    import pyddl.torch as hvd

    hvd.init()
    if rank == world - 1:
        return hvd.join()
    order = ["a", "b"] if rank == 0 else ["b", "a"]
    handles = {n: hvd.allreduce_async(torch.full((2,), (rank + 1.0) * (1 if n == "a" else 10)), name=n, op=hvd.Sum)
               for n in order}
    out = {n: hvd.synchronize(h).tolist() for n, h in handles.items()}
    hvd.join()
    return out


@pytest.mark.timeout(90)
def test_named_ops_in_different_orders_while_a_rank_has_joined():
    """Horovod: a joined rank takes part in every allreduce with zeros, named or not; the
    others' named ops in different orders still match by name."""
    *outs, last = run_ranks(_joined_rank, 3)
    for out in outs:
        assert out == {"a": [3.0, 3.0], "b": [30.0, 30.0]}
    assert last in (0, 1, 2)


def _same_order(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    for step in range(3):
        handles = [hvd.allreduce_async(torch.ones(3), name=f"g{i}") for i in range(8)]
        for h in handles[::-1]:
            hvd.synchronize(h)
    return pyddl.world().negotiations


@pytest.mark.timeout(90)
def test_ranks_submitting_names_in_one_order_never_negotiate():
    """Horovod negotiates every name once, then serves it from its cache; pyddl's ranks agree
    on the order they already share without negotiating at all."""
    assert run_ranks(_same_order, 2) == [0, 0]


def _check_off(rank, world):
    import pyddl
    import pyddl.torch as hvd

    hvd.init()
    handles = [hvd.allreduce_async(torch.tensor([float(rank + 1) * 10 ** i]), name=n, op=hvd.Sum)
               for i, n in enumerate("abc")]
    return [hvd.synchronize(h).item() for h in handles], pyddl.world().negotiations


@pytest.mark.timeout(90)
def test_without_the_check_named_ops_run_in_submission_order():
    """With the check off (PYDDL_CHECK=0) there is no exchange to match names by: named ops run
    in each rank's submission order, so every rank must submit them in one order."""
    for sums, negotiations in run_ranks(_check_off, 2, env={"PYDDL_CHECK": "0"}):
        assert sums == [3.0, 30.0, 300.0] and negotiations == 0


def _across_a_barrier(rank, world):
    import pyddl.torch as hvd

    hvd.init()
    x = torch.full((2, 3), float(rank))
    # Horovod's test_horovod_allgather_duplicate_name_error: rank 0 submits the name before
    # the barrier, rank 1 after it.
    if rank == 0:
        h = hvd.allgather_async(x, name="dup")
    hvd.barrier()
    if rank > 0:
        h = hvd.allgather_async(x, name="dup")
    hvd.barrier()
    return hvd.synchronize(h)[:, 0].tolist()


@pytest.mark.timeout(90)
def test_a_named_op_pairs_up_across_a_barrier():
    """Horovod's barrier is itself matched by name (BARRIER_TENSOR_NAME, "barrier.noname"), so
    a named op rank 0 submits before a barrier and rank 1 after it still pairs up."""
    for rows in run_ranks(_across_a_barrier, 2):
        assert rows == [0.0, 0.0, 1.0, 1.0]
