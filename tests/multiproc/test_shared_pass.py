"""Queued multiring allreduces share one pipelined pass (fusion.Part): when the cross-rank check
has found the same calls queued behind a running one on every rank, the running call takes
those of its kind (wire dtype, op, algorithm) and pipelines all their chunks through the
stages at once. Every result must be what each call alone gives, and every guarantee of the
check must hold: a mismatch in the queue still raises at that call on every rank."""

import pytest
import torch

from harness import hold_engine, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

ENV = {"LOCAL_WORLD_SIZE": "2"}


def _calls(rank, world, bad):
    """Ten queued calls: sums of several chunks (chunk_bytes is 4 KiB), an average, an
    out-of-place sum, integers; one call of a different shape on rank 1 where i == bad."""
    import pyddl

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=4096, allreduce="multiring")
    comm = pyddl.world()
    release = hold_engine(comm)
    handles = []
    for i in range(10):
        n = 1000 * (i + 1) + (1 if rank == 1 and i == bad else 0)
        value = float((rank + 1) * (i + 1))
        if i == 5:
            handles.append(comm.allreduce_async_(torch.full((n,), value), op="average"))
        elif i == 6:
            handles.append(comm.allreduce_async(torch.full((n,), value)))
        elif i == 7:
            handles.append(comm.allreduce_async_(torch.full((n,), (rank + 1) * (i + 1), dtype=torch.int64)))
        else:
            handles.append(comm.allreduce_async_(torch.full((n,), value)))
    release.set()
    out = []
    for h in handles:
        try:
            t = h.wait()
            out.append((t.numel(), t.dtype, sorted(set(t.tolist()))))
        except pyddl.CollectiveMismatchError as exc:
            out.append(f"mismatch: {exc}")
    after = comm.allreduce(torch.tensor([float(rank)])).item()  # the job goes on
    return out, comm.shared, comm.exchanges, after


def _expected(i):
    total = 10 * (i + 1)  # ranks give (rank + 1) x (i + 1): 1 + 2 + 3 + 4 = 10
    if i == 5:
        return 1000 * (i + 1), torch.float32, [total / 4]
    if i == 7:
        return 1000 * (i + 1), torch.int64, [total]
    return 1000 * (i + 1), torch.float32, [float(total)]


def test_queued_calls_share_passes_with_every_result_exact():
    for out, shared, exchanges, after in run_ranks(_calls, 4, -1, env=ENV):
        assert out == [_expected(i) for i in range(10)]
        # The first call's check covers the next 7; the first takes the float sums 1-4 (the
        # average at 5 is another kind); 6 takes nothing (7 is int64), 8 takes 9.
        assert shared == 5
        assert after == 6.0


def test_a_mismatch_in_the_queue_raises_at_that_call_on_every_rank():
    results = run_ranks(_calls, 4, 3, env=ENV)
    assert len({r[0][3] for r in results}) == 1  # the same error, the same collective number
    for out, shared, exchanges, after in results:
        for i, got in enumerate(out):
            if i == 3:
                assert got.startswith("mismatch:") and "differs across ranks" in got, got
            else:
                assert got == _expected(i)
        # The first check stops short of call 3, so the first call takes only 1 and 2; call 4
        # checks itself and the rest, and 8 takes 9 as before.
        assert shared == 3
        assert after == 6.0


def _with_and_without_check(rank, world):
    import pyddl

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=4096, allreduce="multiring")
    comm = pyddl.world()
    out = []
    for check in (True, False):
        comm.set_check(check)
        shared = comm.shared
        release = hold_engine(comm)
        handles = [comm.allreduce_async_(torch.full((3000,), float(rank + 1))) for _ in range(4)]
        release.set()
        out.append(([sorted(set(h.wait().tolist())) for h in handles], comm.shared - shared))
    return out


def test_only_calls_the_check_vouched_for_are_shared():
    for (sums_on, shared_on), (sums_off, shared_off) in run_ranks(_with_and_without_check, 4, env=ENV):
        assert sums_on == sums_off == [[10.0]] * 4
        # Without the check no rank knows what the others have queued: each call runs alone.
        assert (shared_on, shared_off) == (3, 0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def _batch(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _gradient_steps(rank, world):
    """One DistributedOptimizer step per wire precision, its buckets all queued behind a held
    engine."""
    import pyddl
    from pyddl.torch import Compression
    from pyddl.torch.optimizer import DistributedOptimizer

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=4096)
    comm = pyddl.world()
    out = {}
    for compression in ("none", "fp16"):
        model = _model()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters(), algorithm="multiring",
                                   bucket_bytes=600, compression=getattr(Compression, compression))
        x, y = _batch(rank)
        shared, chunks = comm.shared, comm.pass_chunks
        release = hold_engine(comm)
        torch.nn.functional.mse_loss(model(x), y).backward()
        release.set()
        opt.step()
        out[compression] = ([p.detach().clone() for p in model.parameters()], comm.shared - shared,
                            comm.pass_chunks - chunks)
    return out


def test_gradient_buckets_queued_in_backward_share_a_pass():
    model = _model()
    grads = []
    for rank in range(4):
        model.zero_grad()
        x, y = _batch(rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    expected = [p.detach() - 0.5 * sum(g[i] for g in grads) / 4 for i, p in enumerate(model.parameters())]
    for out in run_ranks(_gradient_steps, 4, env=ENV):
        for compression, (params, shared, chunks) in out.items():
            tol = 2e-3 if compression == "fp16" else 1e-6
            for p, q in zip(params, expected):
                assert torch.allclose(p, q, atol=tol, rtol=tol), f"{compression}: max diff {(p - q).abs().max()}"
            assert shared > 0, compression
            # The reducer lays its buckets back to back, and all 484 gradients fit one 4 KiB
            # chunk: one chunk per pass, where buckets with buffers of their own would take
            # one each (more chunks than the calls taken).
            assert chunks <= shared, (compression, chunks, shared)


# Buckets of at most 8 KiB over mixed dtypes and an empty tensor: several buckets, some of
# several chunks, all in one pass.
SIZES = [3000, 500, 0, 5000, 1]
DTYPES = [torch.float32, torch.int64, torch.float32, torch.float64, torch.float32]


def _grouped(rank, world):
    import pyddl

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=4096, allreduce="multiring")
    out = {}
    for op in ("sum", "average"):
        ts = [torch.full((n,), (rank + 1) * (k + 1), dtype=d) for k, (n, d) in enumerate(zip(SIZES, DTYPES))]
        pyddl.grouped_allreduce_(ts, op=op, bucket_bytes=8192)
        out[op] = [(t.numel(), t.dtype, sorted(set(t.tolist()))) for t in ts]
    return out


def test_grouped_allreduce_buckets_share_one_pass():
    def value(op, k, dtype):  # ranks give (rank + 1) x (k + 1): 1 + 2 + 3 + 4 = 10 of it in all
        if op == "sum":
            return 10 * (k + 1)
        return 2.5 * (k + 1) if dtype.is_floating_point else 10 * (k + 1) // 4  # integers floor

    for out in run_ranks(_grouped, 4, env=ENV):
        for op in ("sum", "average"):
            assert out[op] == [(n, d, [value(op, k, d)] if n else []) for k, (n, d) in enumerate(zip(SIZES, DTYPES))]


def _views_and_tensors(rank, world):
    """allreduce_many_ over three buffers of 600 floats (a 4 KiB chunk holds 1024 of them):
    views back to back in one tensor, then three tensors of their own."""
    import pyddl
    from pyddl.comm.multiring import allreduce_many_

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=4096)
    comm = pyddl.world()
    whole = torch.empty(1800)
    out = {}
    for seq, (name, op, flats) in enumerate([("views", "sum", list(whole.split(600))),
                                             ("views", "average", list(whole.split(600))),
                                             ("tensors", "sum", [torch.empty(600) for _ in range(3)])]):
        calls = []
        drained = [None] * 3

        def fill(i):
            calls.append(("fill", i))
            flats[i].fill_((rank + 1) * (i + 1))

        def drain(i):
            calls.append(("drain", i))
            drained[i] = sorted(set(flats[i].tolist()))

        comm.barrier()
        chunks = allreduce_many_(comm, flats, op, 1000 + seq, fill, drain)
        out[(name, op)] = chunks, sorted(calls), drained
    return out


def test_buffers_back_to_back_in_one_tensor_share_chunks():
    once = sorted([("fill", i) for i in range(3)] + [("drain", i) for i in range(3)])
    for out in run_ranks(_views_and_tensors, 4, env=ENV):
        # Ranks give (rank + 1) x (i + 1): 10 (i + 1) in all. 1800 floats back to back are two
        # chunks; three tensors of 600 are three.
        assert out[("views", "sum")] == (2, once, [[10.0], [20.0], [30.0]])
        assert out[("views", "average")] == (2, once, [[2.5], [5.0], [7.5]])
        assert out[("tensors", "sum")] == (3, once, [[10.0], [20.0], [30.0]])


def _join_behind_a_queue(rank, world):
    import pyddl

    pyddl.init(topology="2x2", timeout_s=60, chunk_bytes=4096, allreduce="multiring")
    comm = pyddl.world()
    release = hold_engine(comm)
    calls = 2 if rank == 0 else 4  # rank 0 runs out of data two calls early and joins
    handles = [comm.allreduce_async_(torch.full((3000,), float(rank + 1) * (i + 1))) for i in range(calls)]
    release.set()
    sums = [sorted(set(h.wait().tolist())) for h in handles]
    return sums, comm.join(), comm.shared


def test_a_rank_that_joined_serves_the_calls_the_others_queued():
    results = run_ranks(_join_behind_a_queue, 4, env=ENV)
    # The first call's check covers the second on every rank; the third and fourth run alone,
    # rank 0 contributing zeros: 2 + 3 + 4 = 9 of each.
    assert results[0][0] == [[10.0], [20.0]]
    for sums, last, shared in results[1:]:
        assert sums == [[10.0], [20.0], [27.0], [36.0]]
    # Ranks 1-3 join at the same collective number, so the last joiner is the highest rank; the
    # first call took the second on every rank, rank 0's included.
    assert [r[1:] for r in results] == [(3, 1)] * 4
