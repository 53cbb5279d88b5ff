"""Error paths: mismatched calls, a rank that never arrives, misuse before init, bad input."""

import time

import pytest
import torch

from harness import run_ranks

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
        time.sleep(20)  # never reaches collective #2 in time
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
        return str(err), err.missing_ranks, time.monotonic() - t0, again
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
        assert ok == 2.0
