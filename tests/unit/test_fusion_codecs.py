import pytest
import torch

from pyddl.comm.codecs import ENCODE_BLOCK, get_codec
from pyddl.comm.fusion import Packing, pack, unpack
from pyddl.comm.layout import plan_buckets
from pyddl.comm.multiring import plan_chunks
from pyddl.comm.ring import equal_parts


def test_buckets_respect_cap_and_order():
    items = [(10, "float32", 4)] * 5  # 40 bytes each: a bucket closes at 120 >= 100
    assert plan_buckets(items, 100) == [[0, 1, 2], [3, 4]]
    assert plan_buckets(items, 80) == [[0, 1], [2, 3], [4]]


def test_buckets_split_by_dtype_and_keep_big_tensors_whole():
    items = [(4, "float32", 4), (4, "int64", 8), (4, "float32", 4)]
    assert plan_buckets(items, 64) == [[0, 2], [1]]
    # A tensor over the cap closes the bucket it joins, with the small ones before it (DDP's
    # rule): small gradients between two big ones do not take a collective of their own.
    items = [(4, "float32", 4), (100, "float32", 4), (4, "float32", 4), (100, "float32", 4), (4, "float32", 4)]
    assert plan_buckets(items, 64) == [[0, 1], [2, 3], [4]]
    assert plan_buckets([(100, "float32", 4), (100, "float32", 4)], 64) == [[0], [1]]


def test_every_tensor_in_exactly_one_bucket():
    items = [(n, "float32" if n % 3 else "float16", 4 if n % 3 else 2) for n in range(1, 60)]
    buckets = plan_buckets(items, 200)
    assert sorted(i for b in buckets for i in b) == list(range(59))
    for b in buckets:
        assert len({items[i][1] for i in b}) == 1
        sizes = [items[i][0] * items[i][2] for i in b]
        # Every bucket but the last of its dtype reached the cap, and only with its last tensor.
        assert sum(sizes[:-1]) < 200
    for dtype in ("float32", "float16"):
        closed = [b for b in buckets if items[b[0]][1] == dtype][:-1]
        assert all(sum(items[i][0] * items[i][2] for i in b) >= 200 for b in closed)


def test_the_first_bucket_of_each_dtype_closes_early():
    items = [(4, "float32", 4), (4, "float16", 2), (4, "float32", 4), (4, "float16", 2), (4, "float32", 4)]
    # float32 (16 bytes each): first bucket closes at 16, the next at 32; float16 (8 bytes):
    # its first closes at 16 too. No tensor is lost or planned twice, whatever the dtypes' order.
    assert plan_buckets(items, 32, first_bucket_bytes=16) == [[0], [1, 3], [2, 4]]
    assert plan_buckets(items, 32) == [[0, 2], [1, 3], [4]]
    # The first bucket keeps its smaller limit for every tensor it takes, not only its first.
    assert plan_buckets([(2, "float32", 4)] * 6, 32, first_bucket_bytes=16) == [[0, 1], [2, 3, 4, 5]]


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        plan_buckets([(1, "float32", 4)], 0)
    with pytest.raises(ValueError, match="first_bucket_bytes must be positive, got -1"):
        plan_buckets([(1, "float32", 4)], 8, first_bucket_bytes=-1)


@pytest.mark.parametrize("cuts", [[0, 40], [0, 1, 2, 3, 40], [0, 7, 8, 19, 33, 40], [0, 13, 26, 39, 40]])
def test_packing_fills_any_cut_into_ranges_like_one_whole_pack(cuts):
    # Leaves at spans with gaps (alignment) and an empty leaf; the multiring fills chunk by
    # chunk, in any order its pipeline reaches them. Every cut must give the one-pass buffer.
    sources = [torch.arange(1.0, 6.0), torch.zeros(0), torch.arange(10.0, 17.0), torch.arange(20.0, 29.0)]
    spans = [(0, 5), (8, 0), (8, 7), (24, 9)]  # gaps at 5-8, 15-24 and after 33
    expected = torch.zeros(40)
    for (offset, n), source in zip(spans, sources):
        expected[offset: offset + n] = source
    packing = Packing(torch.full((40,), float("nan")), sources, spans)
    ranges = list(zip(cuts, cuts[1:]))
    for lo, hi in reversed(ranges):
        packing.fill(lo, hi)
    assert torch.equal(packing.flat, expected)


def test_packing_back_to_back_has_no_gaps():
    sources = [torch.randn(3), torch.randn(0), torch.randn(5)]
    packing = Packing.back_to_back(sources, torch.device("cpu"))
    packing.fill(0, 4)
    packing.fill(4, 8)
    assert torch.equal(packing.flat, torch.cat(sources))


def test_pack_unpack_round_trip():
    ts = [torch.randn(3, 4), torch.randn(0), torch.randn(7), torch.randn(2, 2, 2)]
    flat = pack(ts)
    assert flat.numel() == 12 + 0 + 7 + 8
    outs = [torch.empty_like(t) for t in ts]
    unpack(flat, outs)
    for a, b in zip(ts, outs):
        assert torch.equal(a, b)


def _encode(codec, tensor, op, world_size):
    wire = torch.empty(tensor.shape, dtype=codec.wire_dtype)
    codec.encode_(tensor, wire, op, world_size)
    return wire


@pytest.mark.parametrize("name, wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_codecs_prescale_for_sum_and_restore(name, wire):
    codec = get_codec(name)
    x = torch.tensor([60000.0, -3.0, 0.5])
    w = _encode(codec, x, "sum", 4)
    assert w.dtype == wire
    out = torch.empty_like(x)
    codec.decode_(w, out, "sum", 4)  # as if the other ranks sent zeros
    assert torch.allclose(out, x, rtol=1e-2)
    assert not codec.applies_to(torch.ones(2, dtype=torch.int64))


def test_fp16_overflow_is_avoided_by_prescaling():
    # 8 ranks x 30000 = 240000 overflows fp16 (max 65504) unless each rank divides by 8 first.
    codec = get_codec("fp16")
    wires = [_encode(codec, torch.tensor([30000.0]), "sum", 8) for _ in range(8)]
    wire_sum = torch.stack(wires).sum(0, dtype=torch.float16)
    assert torch.isfinite(wire_sum).all()
    assert not torch.isfinite(torch.tensor([30000.0] * 8, dtype=torch.float16).sum(dtype=torch.float16))
    out = torch.empty(1)
    codec.decode_(wire_sum, out, "sum", 8)
    assert out.item() == pytest.approx(240000.0, rel=1e-3)


def test_a_value_beyond_fp16_range_is_divided_before_the_cast():
    # 100000 does not fit fp16 (max 65504); divided by 2 ranks first it does.
    wire = _encode(get_codec("fp16"), torch.tensor([100000.0, -1e5]), "average", 2)
    assert torch.equal(wire, torch.tensor([50000.0, -50000.0], dtype=torch.float16))


@pytest.mark.parametrize("op", ["sum", "average", "max"])
def test_encode_in_blocks_equals_one_division_and_cast(op):
    # 2.5 blocks: the last one partial. The same bits as dividing the whole tensor at once.
    x = torch.randn(ENCODE_BLOCK * 5 // 2, generator=torch.Generator().manual_seed(0)) * 1e5
    whole = (torch.div(x, 3) if op != "max" else x).to(torch.float16)
    assert torch.equal(_encode(get_codec("fp16"), x, op, 3), whole)


def test_pack_scales_in_the_source_dtype_before_narrowing():
    grads = [torch.tensor([1e5, 2.0]), torch.tensor([[-1e5]])]
    out = pack(grads, out=torch.empty(3, dtype=torch.float16), scale=0.5)
    assert torch.equal(out, torch.tensor([50000.0, 1.0, -50000.0], dtype=torch.float16))


def test_unknown_codec():
    with pytest.raises(ValueError, match="none, fp16, bf16"):
        get_codec("int4")


def test_equal_parts_cover_range():
    assert equal_parts(10, 7, 3) == [(10, 3), (13, 2), (15, 2)]
    assert equal_parts(0, 2, 4) == [(0, 1), (1, 1), (2, 0), (2, 0)]


def test_plan_chunks():
    chunks = plan_chunks(1000, 4, 400, 4)  # 100 elements per chunk
    assert chunks[0] == (0, 100) and sum(n for _, n in chunks) == 1000
    assert plan_chunks(0, 4, 400, 4) == []
    assert plan_chunks(3, 4, 4, 8) == [(0, 3)]


def test_auto_picks_the_choice_of_the_nearest_timed_size_on_a_log_scale():
    from pyddl.comm.auto import AutoTable

    table = AutoTable((16 * 1024, 512 * 1024, 8 * 1024 * 1024), ("native", "multiring", "native"), {})
    assert [table.pick(n) for n in (0, 1, 16 * 1024, 90 * 1024, 100 * 1024, 2 * 2**20, 3 * 2**20, 2**30)] == [
        "native", "native", "native", "native", "multiring", "multiring", "native", "native"]
