"""Error paths: mismatched calls, a rank that never arrives, misuse before init, bad input."""

import os
import time

import pytest
import torch

from harness import run_ranks, wait_for_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(90)]


def _mismatched_shapes(rank, world):
    import pyddl

    pyddl.init(timeout_s=20)
    try:
        pyddl.allreduce(torch.ones(4 if rank == 0 else 5))
    except pyddl.CollectiveMismatchError as err:
        return str(err)
    return "no error"


def test_mismatched_shapes_fail_on_every_rank():
    texts = run_ranks(_mismatched_shapes, 3)
    for text in texts:
        assert "collective #1 differs across ranks" in text
        assert "ranks 0: allreduce(float32[4]" in text
        assert "ranks 1,2: allreduce(float32[5]" in text


def _mismatched_order(rank, world):
    import pyddl

    pyddl.init(timeout_s=20)
    try:
        if rank == 0:
            pyddl.broadcast(torch.ones(2))
        else:
            pyddl.allreduce(torch.ones(2))
    except pyddl.CollectiveMismatchError as err:
        return str(err)
    return "no error"


def test_different_collectives_in_the_same_slot_is_an_error():
    for text in run_ranks(_mismatched_order, 2):
        assert "broadcast(float32[2] root=0)" in text and "allreduce(float32[2]" in text


def _missing_rank(rank, world):
    import pyddl

    pyddl.init(timeout_s=3)
    pyddl.allreduce(torch.ones(1))  # collective #1: everyone
    if rank == 2:
        wait_for_ranks([0, 1], 30)  # never reaches collective #2 (the others give up after 3 s)
        return "slept"
    t0 = time.monotonic()
    try:
        pyddl.allreduce(torch.ones(1), algorithm="multiring")
    except pyddl.CollectiveTimeoutError as err:
        again = ""
        try:
            pyddl.allreduce(torch.ones(1))
        except pyddl.CollectiveError as later:
            again = str(later)
        waited = time.monotonic() - t0
        return str(err), err.missing_ranks, waited, again
    return "no error"


def test_a_rank_that_never_arrives_is_named():
    results = run_ranks(_missing_rank, 3, timeout=60)
    for rank in (0, 1):
        text, missing, waited, again = results[rank]
        assert "allreduce(float32[1] op=sum algorithm=multiring" in text
        assert "collective #2" in text and "timed out after 3 s" in text
        assert "rank 2 is at collective #1 (allreduce)" in text
        assert missing == (2,)
        assert waited < 15
        assert "an earlier collective failed" in again


def _late_to_init(rank, world, late):
    import pyddl

    if rank in late:
        # Never joins: the others give up after 4 s.
        wait_for_ranks([r for r in range(world) if r not in late], 30)
        return None
    t0 = time.monotonic()
    try:
        pyddl.init(timeout_s=4)
    except pyddl.CollectiveTimeoutError as err:
        return str(err), err.missing_ranks, time.monotonic() - t0
    return "joined", (), 0.0


def test_ranks_that_never_call_init_are_named_in_a_timeout_error_saying_what_to_check():
    (text, missing, waited), (text1, _, _), _, _ = run_ranks(_late_to_init, 4, {2, 3}, timeout=60)
    assert "pyddl.init: rank 0 waited 4 s for the other ranks of a 4-rank job" in text
    assert "rank(s) 2, 3 never did" in text and "check WORLD_SIZE and MASTER_ADDR:MASTER_PORT" in text
    assert missing == (2, 3) and "rank(s) 2, 3 never did" in text1
    assert waited < 12


def test_a_missing_rank_0_is_named_as_the_rendezvous_it_serves():
    _, (text, _, waited) = run_ranks(_late_to_init, 2, {0}, timeout=60)
    assert "pyddl.init: rank 1 could not reach the job's rendezvous at" in text
    assert "which rank 0 serves" in text and "check MASTER_ADDR:MASTER_PORT" in text
    # torch's store client retries a failed connection after a random back-off (one run here:
    # a 4 s try, 5.5 s of back-off, another 4 s try), so the error can come ~3x the timeout late.
    assert waited < 20


def _before_init(rank, world):
    import pyddl

    out = []
    for call in (lambda: pyddl.allreduce(torch.ones(1)), pyddl.rank, pyddl.barrier):
        try:
            call()
        except pyddl.NotInitializedError as err:
            out.append(str(err))
    return out


def test_collective_before_init_is_a_clear_error():
    (texts,) = run_ranks(_before_init, 1)
    assert len(texts) == 3 and all("call pyddl.init() first" in t for t in texts)


def _bad_input(rank, world):
    import pyddl

    errors = []
    try:
        pyddl.init(topology="3x2")
    except ValueError as err:
        errors.append(str(err))
    pyddl.init()
    pyddl.init()  # a second call is harmless
    for call in (
        lambda: pyddl.broadcast(torch.ones(1), root=world),
        lambda: pyddl.allreduce(torch.ones(1), op="median"),
        lambda: pyddl.allreduce([1, 2]),
        lambda: pyddl.allreduce(torch.ones(1, dtype=torch.complex64)),
        lambda: pyddl.allreduce(torch.ones(1), algorithm="tree"),
        lambda: pyddl.allgather(torch.tensor(1.0)),
        lambda: pyddl.allreduce(torch.ones(3).to_sparse()),
    ):
        try:
            call()
            errors.append("no error")
        except (ValueError, TypeError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    ok = pyddl.allreduce(torch.ones(1)).item()  # nothing above broke the job
    pyddl.shutdown()
    return errors, ok


def test_bad_input_is_rejected_before_any_collective():
    for errors, ok in run_ranks(_bad_input, 2):
        assert "world size 2 does not match topology 3x2 (= 6 ranks)" in errors[0]
        assert "broadcast root 2 is out of range: this job has ranks 0..1" in errors[1]
        assert "unknown reduction op 'median'" in errors[2]
        assert errors[3].startswith("TypeError: tensor must be a torch.Tensor, got list")
        assert "dtype torch.complex64" in errors[4]
        assert "unknown allreduce algorithm 'tree'" in errors[5]
        assert "at least one axis" in errors[6]
        assert errors[7].startswith("TypeError: tensor is a torch.sparse_coo tensor; pyddl collectives take dense")
        assert "sparse_allreduce_async" in errors[7]
        assert ok == 2.0


def _uneven(rank, world):
    import torch.nn as nn

    import pyddl
    from pyddl.torch.optimizer import DistributedOptimizer

    pyddl.init(timeout_s=20, allreduce="auto")
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    sums = []
    for step in range(rank + 1):  # rank r has r+1 batches: uneven inputs
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        sums.append(pyddl.allreduce(torch.tensor([1.0]), algorithm="multiring").item())
    last = pyddl.join()
    after = pyddl.allreduce(torch.tensor([rank + 1]), algorithm="multiring").item()  # the job goes on
    try:
        pyddl.join() if rank else pyddl.broadcast(torch.ones(1))
        refused = "no error"
    except pyddl.CollectiveError as err:
        refused = str(err)
    if rank == 0:
        pyddl.join()  # its broadcast was refused; the joined ranks are still serving
    again = pyddl.allreduce(torch.tensor([rank + 1])).item()
    return sums, last, after, [p.detach().clone() for p in model.parameters()], refused, again


def test_join_serves_uneven_batches_then_the_job_goes_on():
    results = run_ranks(_uneven, 3)
    # Step k runs on ranks >= k; the joined ones add zeros to the count.
    assert [r[0] for r in results] == [[3.0], [3.0, 2.0], [3.0, 2.0, 1.0]]
    assert {r[1] for r in results} == {2}
    assert {r[2] for r in results} == {6}
    # d(sum of outputs)/dW = 4 per element on a batch of 4 ones; averaged over 3 ranks with
    # joined ranks adding zeros, step k moves W by lr x 4 x (3 - k) / 3.
    torch.manual_seed(0)
    w0 = torch.nn.Linear(3, 2).weight.detach()
    moved = [0.4, 0.4 + 0.4 * 2 / 3, 0.8]
    for rank, r in enumerate(results):
        assert torch.allclose(r[3][0], w0 - moved[rank], atol=1e-6)
    # Horovod's meaning (its test_horovod_join_broadcast): the call that joined ranks cannot
    # serve raises on the rank that made it, found before any data moved; the joined ranks go
    # on serving until it joins too, and the job stays usable.
    assert "ranks 1,2 have called join(), and broadcast(float32[1] root=0) cannot run" in results[0][4]
    assert [r[4] for r in results[1:]] == ["no error", "no error"]
    assert [r[5] for r in results] == [6, 6, 6]


def _straggler(rank, world):
    import contextlib
    import io

    import pyddl

    os.environ["PYDDL_STALL_WARN"] = "1"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pyddl.init(timeout_s=30)
        pyddl.allreduce(torch.ones(1))
        if rank == 1:
            time.sleep(4)  # slow, but well within the timeout
        value = pyddl.allreduce(torch.ones(1)).item()
        pyddl.shutdown()
    return value, err.getvalue()


def test_a_straggler_is_a_warning_naming_it_not_an_error():
    (v0, err0), (v1, err1) = run_ranks(_straggler, 2)
    assert v0 == v1 == 2.0
    assert "pyddl: warning: rank 0 has waited" in err0
    assert "in collective #2 (allreduce) for slower ranks: rank 1 is 1 collective(s) behind, at #1 (allreduce)" in err0
    assert "warning" not in err1


def _check_switched(rank, world):
    import pyddl

    pyddl.init(timeout_s=20)
    pyddl.set_check(False)
    off = pyddl.settings().check
    total = pyddl.allreduce(torch.tensor([float(rank + 1)])).item()  # runs unchecked
    try:
        pyddl.join()
        join_off = "no error"
    except pyddl.PyddlError as err:
        join_off = str(err)
    pyddl.set_check(True)
    try:
        pyddl.allreduce(torch.ones(2 if rank == 0 else 3))
        mismatch = "no error"
    except pyddl.CollectiveMismatchError as err:
        mismatch = str(err)
    return off, total, join_off, pyddl.settings().check, mismatch


def test_set_check_turns_the_check_off_and_on_on_every_rank():
    for off, total, join_off, on, mismatch in run_ranks(_check_switched, 3):
        assert off is False and on is True
        assert total == 6.0
        assert "join() needs the per-collective exchange" in join_off
        assert "ranks 0: allreduce(float32[2]" in mismatch and "ranks 1,2: allreduce(float32[3]" in mismatch


def _check_switched_apart(rank, world):
    import pyddl

    pyddl.init(timeout_s=20)
    try:
        pyddl.set_check(rank != 0)
    except pyddl.CollectiveMismatchError as err:
        return str(err), pyddl.settings().check
    return "no error", pyddl.settings().check


def test_set_check_asked_differently_across_ranks_is_an_error_everywhere():
    for text, check in run_ranks(_check_switched_apart, 2):
        assert "ranks 0: set_check(enabled=False); ranks 1: set_check(enabled=True)" in text
        assert check is True  # nobody switched
