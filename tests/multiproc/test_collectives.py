"""Every algorithm and dtype on 2-8 Gloo ranks over flat and multi-dim topologies, against
closed forms (rank r contributes r+1, so the sum is W(W+1)/2) and against `native`."""

import os

import pytest
import torch

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
# Uneven sizes, tiny and empty ones, and one that the 16 KiB test chunk pipelines in two chunks.
SIZES = [0, 1, 3, 7, 1000, 6007]
# `auto` runs one of these two: test_communicators checks its results and the test below its
# first use. Tuned with this file's 16 KiB chunks (16 MiB in 1024 of them), it took 27 of the
# full matrix's 34 s on a slow day.
ALGORITHMS = ["native", "multiring"]


def _closed_forms(rank, world, spec, full):
    import pyddl

    # 16 KiB chunks: the larger sizes below are pipelined in 2 to 8 chunks.
    pyddl.init(topology=spec, timeout_s=60, chunk_bytes=16384)
    failures = []
    expect_sum = world * (world + 1) // 2
    # The full matrix (every dtype and size) on 2 servers x 2 ranks, which has both
    # levels and 2-rank rings; the other layouts run a reduced one (CI has 2 cores).
    dtypes = DTYPES if full else [torch.float32, torch.float16, torch.int64]
    sizes = SIZES if full else [0, 3, 6007]
    for alg in ALGORITHMS:
        for dtype in dtypes:
            for numel in sizes:
                x = torch.full((numel,), rank + 1, dtype=dtype)
                got = pyddl.allreduce(x, algorithm=alg)
                if got.dtype != dtype or got.shape != x.shape or not torch.all(got == expect_sum):
                    failures.append(f"sum {alg} {dtype} n={numel}: {got[:4].tolist()}")
                if not torch.all(x == rank + 1):
                    failures.append(f"allreduce modified its input ({alg} {dtype})")
            base = torch.arange(11, dtype=dtype).reshape(1, 11) * (1 if dtype.is_floating_point else 2)
            mn = pyddl.allreduce(base + rank, op="min", algorithm=alg)
            mx = pyddl.allreduce(base + rank, op="max", algorithm=alg)
            if not torch.equal(mn, base) or not torch.equal(mx, base + world - 1):
                failures.append(f"min/max {alg} {dtype}")
            avg = pyddl.allreduce(base + 2 * rank, op="average", algorithm=alg)
            if not torch.equal(avg, base + (world - 1)):  # the mean of 0, 2, ..., 2(W-1)
                failures.append(f"average {alg} {dtype}: {avg.tolist()}")
        prod = pyddl.allreduce(torch.tensor([1.0, rank + 1.0]), op="product", algorithm=alg)
        fact = float(torch.arange(1, world + 1).prod())
        if prod.tolist() != [1.0, fact]:
            failures.append(f"product {alg}: {prod.tolist()}")
        # Random floats: every algorithm agrees with the backend's own allreduce.
        g = torch.Generator().manual_seed(rank)
        r = torch.randn(3, 5003, generator=g, dtype=torch.float64)
        ref = pyddl.allreduce(r, algorithm="native")
        if not torch.allclose(pyddl.allreduce(r, algorithm=alg), ref, rtol=1e-12, atol=1e-12):
            failures.append(f"random float64 {alg} differs from native")
        # In place, on a non-contiguous view, and async.
        y = torch.full((6, 4), rank + 1.0).t()
        out = pyddl.allreduce_(y, algorithm=alg)
        if out is not y or not torch.all(y == expect_sum):
            failures.append(f"in-place non-contiguous {alg}")
        handles = [pyddl.allreduce_async(torch.full((100,), float(rank + k)), algorithm=alg) for k in range(3)]
        for k, h in enumerate(handles):
            if not torch.all(h.wait() == expect_sum + world * (k - 1)):
                failures.append(f"async {alg} #{k}")
        z = torch.full((9,), rank + 1.0)
        h = pyddl.allreduce_async_(z, algorithm=alg)
        if h.wait() is not z or not torch.all(z == expect_sum):
            failures.append(f"async in-place {alg}")
        # Fused: one 56 KB bucket that the multiring packs chunk by chunk (4 chunks of 16 KiB,
        # their edges inside tensors), an empty tensor among them, then averaged.
        parts = [torch.full((n,), float(rank + 1 + k)) for k, n in enumerate([5000, 3, 0, 9000, 1])]
        summed = pyddl.grouped_allreduce(parts, algorithm=alg, bucket_bytes=1 << 20)
        if any(not torch.all(t == expect_sum + world * k) for k, t in enumerate(summed)):
            failures.append(f"grouped sum {alg}: {[t[:2].tolist() for t in summed]}")
        averaged = pyddl.grouped_allreduce(parts, op="average", algorithm=alg, bucket_bytes=1 << 20)
        if any(not torch.all(t == (world + 1) / 2 + k) for k, t in enumerate(averaged)):
            failures.append(f"grouped average {alg}: {[t[:2].tolist() for t in averaged]}")
        # fp16 on the wire: divided and cast chunk by chunk inside the multiring's pipeline
        # (37 chunks of 16 KiB here), in blocks elsewhere (300k elements: two ENCODE_BLOCKs).
        # Values that fp16 holds exactly once divided by W, so the sums are exact.
        pattern = torch.arange(300_000, dtype=torch.float32) % 16
        mean = pattern * (world * (world + 1) // 2)
        x = pattern * world * (rank + 1)
        if not torch.equal(pyddl.allreduce(x, compression="fp16", algorithm=alg), mean * world):
            failures.append(f"fp16 wire sum {alg}")
        if not torch.equal(x, pattern * world * (rank + 1)):
            failures.append(f"fp16 wire allreduce modified its input ({alg})")
        if not torch.equal(pyddl.allreduce_(x, op="average", compression="fp16", algorithm=alg), mean):
            failures.append(f"fp16 wire average {alg}")
    info = (pyddl.local_rank(), pyddl.local_size(), pyddl.cross_rank(), pyddl.cross_size())
    pyddl.shutdown()
    return failures, info


@pytest.mark.parametrize(
    "world, spec, full",
    [(2, "2", False), (3, "3", False), (4, "2x2", True), (6, "3x2", False), (8, "2x2x2", False)],
)
def test_closed_forms(world, spec, full):
    results = run_ranks(_closed_forms, world, spec, full, timeout=170)
    for rank, (failures, info) in enumerate(results):
        assert failures == [], f"rank {rank}: {failures}"
    inner = int(spec.split("x")[0])
    assert [info for _, info in results] == [
        (r % inner, inner, r // inner, world // inner) for r in range(world)
    ]


def _auto_first_used_async(rank, world):
    import time

    import pyddl

    pyddl.init(topology="2", timeout_s=30)  # the job's default is native: auto tunes on first use
    x = torch.arange(300_000, dtype=torch.float32) * (rank + 1)
    first = pyddl.allreduce_async(x, algorithm="auto")
    if rank == 1:
        time.sleep(0.5)  # the other rank submits its next collective while auto would be tuning
    second = pyddl.allreduce_async(x, algorithm="multiring")
    out = (first.wait(), second.wait(), pyddl.allreduce(x, algorithm="native"))
    pyddl.shutdown()
    return out


def test_auto_tuned_on_first_use_while_more_collectives_are_submitted():
    # Tuning used to run on the engine thread while the caller went on submitting; its own
    # collectives then took different numbers on each rank and the multiring's tags mismatched.
    for auto, multiring, native in run_ranks(_auto_first_used_async, 2, timeout=60):
        assert torch.equal(auto, native) and torch.equal(multiring, native)
        assert torch.equal(native, torch.arange(300_000, dtype=torch.float32) * 3)


def _stage_intervals(rank, world):
    import time

    import pyddl
    from pyddl.comm import multiring

    pyddl.init(topology="2x2", timeout_s=30, chunk_bytes=64 * 1024)
    intervals, real = [], multiring._stage_steps

    def timed(stage, levels, buf, op, tag):  # from the stage's first post to its last fold
        t0 = time.perf_counter()
        yield from real(stage, levels, buf, op, tag)
        intervals.append((stage.index, tag & 0xFFF, t0, time.perf_counter()))

    multiring._stage_steps = timed
    x = torch.full((1_000_000,), float(rank + 1))  # 4 MB: 62 chunks of 64 KiB
    got = pyddl.allreduce(x, algorithm="multiring")
    multiring._stage_steps = real
    pyddl.shutdown()
    return torch.all(got == 10).item(), intervals


def test_multiring_stages_overlap_across_chunks():
    # 2x2 has 4 stages (reduce-scatter inside, across; allgather across, inside). Pipelined,
    # a later stage works on chunk c while an earlier one already works on chunk c+1.
    for correct, intervals in run_ranks(_stage_intervals, 4, timeout=60):
        assert correct
        assert sorted({s for s, _, _, _ in intervals}) == [0, 1, 2, 3]
        assert len(intervals) == 4 * 62
        overlapping = sum(
            1 for (s, c, a0, a1) in intervals for (t, d, b0, b1) in intervals
            if t == s + 1 and d == c - 1 and b0 < a1 and a0 < b1
        )
        assert overlapping > 0, "no stage ever ran beside the next stage's previous chunk"


def _other_collectives(rank, world):
    import pyddl

    pyddl.init(timeout_s=60)
    out = {}
    out["broadcast"] = pyddl.broadcast(torch.tensor([rank, 10 * rank]), root=world - 1).tolist()
    t = torch.full((2,), float(rank))
    pyddl.broadcast_(t, root=1)
    out["broadcast_"] = t.tolist()
    out["allgather_equal"] = pyddl.allgather(torch.full((2, 3), rank)).tolist()
    out["allgather_var"] = pyddl.allgather(torch.full((rank, 2), rank, dtype=torch.int32)).tolist()
    rows = torch.arange(2 * world + 1, dtype=torch.float32).reshape(-1, 1) * (rank + 1)
    out["reduce_scatter"] = pyddl.reduce_scatter(rows).reshape(-1).tolist()
    out["reduce_scatter_avg"] = pyddl.reduce_scatter(torch.full((world, 2), 2.0 * rank), op="average").tolist()
    ts = [torch.full((3,), rank + 1.0), torch.full((2, 2), rank + 1, dtype=torch.int64), torch.full((5,), float(rank))]
    pyddl.grouped_allreduce_(ts, bucket_bytes=16)
    out["grouped"] = [t.reshape(-1).tolist() for t in ts]
    comp = {}
    for codec in ("fp16", "bf16"):
        x = torch.linspace(-1000, 1000, 5000) * (rank + 1)
        comp[codec] = (pyddl.allreduce(x, compression=codec, algorithm="multiring") - x / (rank + 1) * world * (world + 1) / 2).abs().max().item()
        comp[codec + "_avg"] = pyddl.allreduce(x, op="average", compression=codec).dtype == torch.float32
    out["compression"] = comp
    pyddl.barrier()
    pyddl.shutdown()
    return out


def test_broadcast_allgather_reduce_scatter_grouped_compression():
    world = 3
    results = run_ranks(_other_collectives, world)
    s = world * (world + 1) / 2
    for rank, out in enumerate(results):
        assert out["broadcast"] == [world - 1, 10 * (world - 1)]
        assert out["broadcast_"] == [1.0, 1.0]
        assert out["allgather_equal"] == [[r] * 3 for r in range(world) for _ in range(2)]
        assert out["allgather_var"] == [[r, r] for r in range(world) for _ in range(r)]
        # 2W+1 = 7 rows over 3 ranks: 3, 2, 2 rows; row i sums to i * W(W+1)/2.
        mine = {0: [0, 1, 2], 1: [3, 4], 2: [5, 6]}[rank]
        assert out["reduce_scatter"] == [i * s for i in mine]
        assert out["reduce_scatter_avg"] == [[float(world - 1)] * 2]
        assert out["grouped"] == [[s] * 3, [int(s)] * 4, [float(sum(range(world)))] * 5]
        # fp16 keeps ~3 significant digits of values up to 6000: error within 0.1%.
        assert out["compression"]["fp16"] < 6000 * 1e-3 * 2
        assert out["compression"]["bf16"] < 6000 * 1e-2
        assert out["compression"]["fp16_avg"] and out["compression"]["bf16_avg"]


def _detect(rank, world):
    import pyddl

    pyddl.init()
    info = (pyddl.topology().dims, pyddl.local_rank(), pyddl.cross_rank())
    pyddl.shutdown()
    return info


def test_topology_from_launcher_variables():
    # As torchrun sets them for 2 servers x 2 workers: LOCAL_WORLD_SIZE and GROUP_RANK.
    results = run_ranks(_detect_with_groups, 4)
    assert results == [((2, 2), r % 2, r // 2) for r in range(4)]


def _detect_with_groups(rank, world):
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    os.environ["GROUP_RANK"] = str(rank // 2)
    return _detect(rank, world)


def test_topology_from_host_names():
    # No launcher hint: all ranks share this host, so one server of 3.
    assert run_ranks(_detect, 3) == [((3, 1), r, 0) for r in range(3)]


def _sparse(rank, world):
    import pyddl
    import pyddl.torch as hvd

    pyddl.init(timeout_s=30)
    # Rank r touches rows 0..r of a 5 x 2 matrix, each with value r + 1; rank 0 also row 4
    # twice (uncoalesced), and the last rank touches nothing (an empty gather).
    rows = list(range(rank + 1)) + ([4, 4] if rank == 0 else [])
    values = torch.full((len(rows), 2), float(rank + 1))
    if rank == world - 1:
        rows, values = [], torch.zeros(0, 2)
    mine = torch.sparse_coo_tensor([rows], values, (5, 2))
    out = {
        "sum": pyddl.sparse_allreduce_async(mine, op="sum").wait(),
        "average": pyddl.sparse_allreduce_async(mine, op="average").wait(),
        "ints": pyddl.sparse_allreduce_async(mine.to(torch.int64), op="sum").wait(),
        "hvd": hvd.sparse_allreduce_async(mine, "emb", hvd.Average)(),
    }
    inplace = mine.clone()
    pyddl.sparse_allreduce_async(inplace, inplace=True).wait()
    out["inplace"] = inplace
    errors = []
    for call in (lambda: pyddl.sparse_allreduce_async(mine, op="max"),
                 lambda: pyddl.sparse_allreduce_async(mine.to(torch.int64), op="average"),
                 lambda: pyddl.sparse_allreduce_async(mine.to_dense())):
        try:
            call()
            errors.append("no error")
        except (TypeError, ValueError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    out["errors"], out["usable"] = errors, pyddl.allreduce(torch.ones(1)).item()
    pyddl.shutdown()
    return out


def test_sparse_allreduce_sums_every_ranks_rows():
    world = 3
    want = torch.zeros(5, 2)
    for r in range(world - 1):
        want[: r + 1] += r + 1
    want[4] += 2.0  # rank 0's row 4, twice
    for out in run_ranks(_sparse, world, timeout=120):
        for key in ("sum", "ints", "inplace"):
            assert out[key].is_sparse and out[key].is_coalesced()
            torch.testing.assert_close(out[key].to_dense(), want.to(out[key].dtype), rtol=0, atol=0)
        for key in ("average", "hvd"):
            torch.testing.assert_close(out[key].to_dense(), want / world)
        assert out["errors"][0].startswith("ValueError: sparse tensors reduce with op sum, or average")
        assert "on torch.int64" in out["errors"][1]
        assert out["errors"][2].startswith("TypeError: sparse_allreduce takes a sparse COO tensor")
        assert out["usable"] == world
