"""Cost model: closed forms, topology-aware costs against hand sums, bounds, monotonicity."""

import itertools
import math
import random

import numpy as np
import pytest

from pyddl.sim.cost import (
    ALGORITHMS,
    Fabric,
    Level,
    allreduce_s,
    expected_max_normal,
    halving_doubling_allreduce_s,
    halving_doubling_s,
    link_bound_s,
    multiring_s,
    native_s,
    ring_allreduce_s,
    straggler_wait_s,
    tree_allreduce_s,
    tree_s,
)

REL = 1e-12
MIB = 1024 * 1024


def flat(n, alpha=1e-5, rate=1e9, gamma=2e-10):
    return Fabric((Level("net", alpha, rate),), (n,), gamma)


def test_closed_forms_by_hand():
    # n=4, S=4e6 B, alpha=10 us, beta=1 ns/B, gamma=0.1 ns/B.
    assert ring_allreduce_s(4, 4e6, 1e-5, 1e-9, 1e-10) == pytest.approx(6e-5 + 6e-3 + 3e-4, rel=REL)
    assert halving_doubling_allreduce_s(4, 4e6, 1e-5, 1e-9, 1e-10) == pytest.approx(4e-5 + 6e-3 + 3e-4, rel=REL)
    assert tree_allreduce_s(4, 4e6, 1e-5, 1e-9, 1e-10) == pytest.approx(4 * (1e-5 + 4e-3) + 2 * 4e-4, rel=REL)
    assert ring_allreduce_s(1, 4e6, 1e-5, 1e-9) == 0.0
    assert ring_allreduce_s(8, 0, 1e-5, 1e-9) == 0.0


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_one_level_algorithms_equal_their_closed_forms(n):
    f = flat(n)
    s = 3 * MIB
    beta = 1 / f.levels[0].link_Bps
    ring = ring_allreduce_s(n, s, 1e-5, beta, 2e-10)
    assert native_s(f, s) == pytest.approx(ring, rel=REL)
    # multiring on one level is a ring (one chunk: nothing to pipeline).
    assert multiring_s(f, s, chunk_bytes=4 * MIB) == pytest.approx(ring, rel=REL)
    assert tree_s(f, s) == pytest.approx(tree_allreduce_s(n, s, 1e-5, beta, 2e-10), rel=REL)
    if n & (n - 1) == 0:
        assert halving_doubling_s(f, s) == pytest.approx(halving_doubling_allreduce_s(n, s, 1e-5, beta, 2e-10), rel=REL)


def test_pipelined_multiring_on_one_level_by_hand():
    n, s, chunk = 4, 16 * MIB, 4 * MIB
    a, r, g = 1e-4, 1e9, 1e-9
    m = chunk / n
    rs = (n - 1) * (a + m / r + m * g)
    ag = (n - 1) * (a + m / r)
    wire = 2 * (n - 1) * m / r  # reduce-scatter and allgather share the ring's links
    expect = rs + ag + 3 * max(rs, ag, wire)
    assert multiring_s(flat(n, a, r, g), s, chunk) == pytest.approx(expect, rel=REL)
    assert multiring_s(flat(n, a, r, g), s, chunk, pipeline=False) == pytest.approx(4 * (rs + ag), rel=REL)


def test_two_level_costs_by_hand():
    a0, r0, a1, r1, g = 2e-6, 40e9, 8e-6, 12.5e9, 4e-12
    f = Fabric((Level("in", a0, r0), Level("out", a1, r1)), (2, 2), g)
    s = 2 * MIB
    # Flat ring over 4 ranks: 6 steps, each as slow as its slowest hop, plus 3 reductions.
    m = s / 4
    assert native_s(f, s) == pytest.approx(6 * max(a0 + m / r0, a1 + m / r1) + 3 * m * g, rel=REL)
    # Multiring, one chunk: level 0 ring on S, then level 1 on S/2 with 2 flows per NIC.
    lvl0 = (a0 + (s / 2) / r0 + (s / 2) * g) + (a0 + (s / 2) / r0)
    m1 = s / 4
    lvl1 = (a1 + m1 / (r1 / 2) + m1 * g) + (a1 + m1 / (r1 / 2))
    assert multiring_s(f, s) == pytest.approx(lvl0 + lvl1, rel=REL)


def test_flat_ring_moves_one_and_a_half_times_the_bound_on_two_servers_of_two():
    # ANCHORS.md: on 2 servers x 2 ranks a flat ring's ceiling is 0.67 of the link bound.
    f = Fabric((Level("in", 0.0, 1e15), Level("out", 0.0, 1.25e8)), (2, 2))
    s = 64 * MIB
    assert link_bound_s(f, s) == pytest.approx(2 * (2 - 1) / 2 * s / 1.25e8, rel=REL)
    assert native_s(f, s) / link_bound_s(f, s) == pytest.approx(1.5, rel=1e-9)


@pytest.mark.parametrize("dims", [(4, 16), (8, 8), (2, 32)])
def test_halving_doubling_and_pipelined_multiring_reach_the_bound_with_free_inner_links(dims):
    f = Fabric((Level("in", 0.0, 1e18), Level("out", 0.0, 12.5e9)), dims)
    s = 256 * MIB
    bound = link_bound_s(f, s)
    assert halving_doubling_s(f, s) == pytest.approx(bound, rel=1e-6)
    assert bound <= multiring_s(f, s, chunk_bytes=MIB) <= 1.02 * bound


def test_no_algorithm_beats_the_link_bound():
    rng = random.Random(7)
    for _ in range(20):
        f = _random_fabric(rng, power_of_two=True)
        s = rng.choice([MIB, 16 * MIB, 100 * MIB])
        for alg in ALGORITHMS:
            assert allreduce_s(f, alg, s) >= link_bound_s(f, s) * (1 - 1e-9), alg


def test_dims_sharing_one_link_share_its_bandwidth():
    ib = Level("ib", 0.0, 12.5e9)
    f = Fabric((Level("nv", 0.0, 1e18), ib, ib), (4, 8, 8))
    s = 256 * MIB
    assert multiring_s(f, s, chunk_bytes=MIB) >= link_bound_s(f, s)


def _random_fabric(rng, power_of_two=False):
    if power_of_two:
        dims = (rng.choice([1, 2, 4, 8]), rng.choice([2, 4, 16]))
    else:
        dims = (rng.choice([1, 2, 3, 4, 6]), rng.choice([2, 3, 5, 16]))
    levels = (
        Level("in", rng.uniform(0, 2e-5), rng.uniform(5e9, 5e11)),
        Level("out", rng.uniform(0, 5e-5), rng.uniform(1e9, 5e10), rng.choice([1, 2, 8])),
    )
    return Fabric(levels, dims, rng.uniform(0, 1e-10))


def _scaled(f, level, latency=1.0, rate=1.0, gamma=1.0):
    levels = tuple(
        Level(lv.name, lv.latency_s * (latency if j == level else 1), lv.link_Bps * (rate if j == level else 1), lv.links)
        for j, lv in enumerate(f.levels)
    )
    return Fabric(levels, f.dims, f.gamma_s_per_byte * gamma)


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_more_bandwidth_never_slower_more_latency_never_faster(alg):
    rng = random.Random(ALGORITHMS.index(alg))
    for _ in range(25):
        f = _random_fabric(rng, power_of_two=alg == "hd")
        s = rng.choice([1024, 300_000, 5 * MIB, 60 * MIB])
        base = allreduce_s(f, alg, s)
        for level, factor in itertools.product(range(2), (1.5, 4.0)):
            assert allreduce_s(_scaled(f, level, rate=factor), alg, s) <= base * (1 + 1e-12)
            assert allreduce_s(_scaled(f, level, latency=factor), alg, s) >= base * (1 - 1e-12)
        assert allreduce_s(_scaled(f, 0, gamma=3.0), alg, s) >= base * (1 - 1e-12)
        assert allreduce_s(f, alg, 2 * s) >= base


def test_auto_is_the_faster_of_native_and_multiring():
    f = Fabric((Level("in", 5e-6, 4e10), Level("out", 6e-6, 1.25e10)), (4, 64), 4e-12)
    for s in (4096, MIB, 64 * MIB):
        assert allreduce_s(f, "auto", s) == min(native_s(f, s), multiring_s(f, s))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="power-of-two"):
        halving_doubling_s(flat(6), MIB)
    with pytest.raises(ValueError, match="unknown algorithm"):
        allreduce_s(flat(4), "bucket-brigade", MIB)
    with pytest.raises(ValueError, match="link_Bps"):
        Level("x", 1e-6, 0.0)
    with pytest.raises(ValueError, match="latency_s"):
        Level("x", -1.0, 1e9)
    with pytest.raises(ValueError, match="one level per dim"):
        Fabric((Level("x", 0, 1e9),), (2, 2))
    with pytest.raises(ValueError, match="positive integers"):
        Fabric((Level("x", 0, 1e9),), (0,))
    assert math.isfinite(tree_s(flat(5), MIB))


def test_pipelining_cannot_overlap_a_ranks_own_reductions():
    # Free links: only reductions cost, and one rank's reductions share its processor, so
    # pipelining 2x2 gains nothing over reducing (1/2 + 1/4) of the buffer in turn.
    f = Fabric((Level("in", 0.0, 1e30), Level("out", 0.0, 1e30)), (2, 2), 1e-9)
    s = 64 * MIB
    assert multiring_s(f, s, chunk_bytes=MIB) == pytest.approx(0.75 * s * 1e-9, rel=1e-9)


def test_multiring_stage_host_time_by_hand():
    # 2 ranks, free links, no reductions, 1 ms of host time per stage and chunk: one chunk
    # goes through its 2 stages in 2 ms; pipelined chunks still take turns on the rank's one
    # interpreter, so 4 chunks cost 4 x 2 ms, unpipelined or not.
    f = Fabric((Level("net", 0.0, 1e30),), (2,), 0.0, stage_s=1e-3)
    assert multiring_s(f, MIB, chunk_bytes=MIB) == pytest.approx(2e-3)
    assert multiring_s(f, 4 * MIB, chunk_bytes=MIB) == pytest.approx(8e-3)
    assert multiring_s(f, 4 * MIB, chunk_bytes=MIB, pipeline=False) == pytest.approx(8e-3)
    assert native_s(f, 4 * MIB) == pytest.approx(0.0, abs=1e-12)  # the backend's own ring: no Python stages
    # On a real link the stage time adds to each stage; the link still sets the period.
    g = Fabric((Level("net", 0.0, 1e9),), (2,), 0.0, stage_s=1e-3)
    wire = MIB / 2 / 1e9
    assert multiring_s(g, 4 * MIB, chunk_bytes=MIB) == pytest.approx(2 * (wire + 1e-3) + 3 * max(wire + 1e-3, 2 * wire, 2e-3))
    with pytest.raises(ValueError, match="stage_s"):
        Fabric((Level("net", 0.0, 1e9),), (2,), 0.0, stage_s=-1.0)


def test_host_load_scales_host_costs_not_links():
    f = Fabric((Level("in", 1e-5, 1e9), Level("out", 1e-4, 1e8)), (2, 2), 1e-9, 2e-4)
    loaded = f.with_host_load(2.0)
    assert loaded.levels == f.levels and loaded.dims == f.dims
    assert loaded.gamma_s_per_byte == 2e-9 and loaded.stage_s == 4e-4
    assert native_s(loaded, 64 * MIB) > native_s(f, 64 * MIB)  # the reductions take longer
    assert f.with_host_load(1.0) == f


# ---- waiting for the slowest worker (issue 22) ----------------------------------------------


def test_expected_max_of_normals_against_closed_forms():
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-9)
    assert expected_max_normal(3) == pytest.approx(3 / (2 * math.sqrt(math.pi)), abs=1e-9)
    # n = 4: (6 / sqrt(pi)) x arctan(sqrt(2)) / pi = 1.0293754 (closed form for four draws)
    assert expected_max_normal(4) == pytest.approx(6 / math.sqrt(math.pi) * math.atan(math.sqrt(2)) / math.pi, abs=1e-9)
    assert expected_max_normal(4) == pytest.approx(1.0293754, abs=1e-6)


@pytest.mark.parametrize("n", [8, 64, 256])
def test_expected_max_of_normals_against_monte_carlo(n):
    rng = np.random.default_rng(n)
    maxima = rng.standard_normal((20000, n)).max(axis=1)
    se = maxima.std() / math.sqrt(len(maxima))
    assert abs(expected_max_normal(n) - maxima.mean()) < 4 * se


def test_straggler_wait_is_monotone_in_n_and_in_spread():
    ns = [1, 2, 4, 8, 16, 64, 256, 1024]
    waits = [straggler_wait_s(n, 0.002) for n in ns]
    assert waits[0] == 0 and all(a < b for a, b in zip(waits, waits[1:]))
    spreads = [0.0, 0.001, 0.002, 0.01]
    by_spread = [straggler_wait_s(64, s) for s in spreads]
    assert by_spread[0] == 0 and all(a < b for a, b in zip(by_spread, by_spread[1:]))
    assert straggler_wait_s(64, 0.01) == pytest.approx(0.01 * expected_max_normal(64))


@pytest.mark.parametrize("n, spread", [(0, 0.1), (2.5, 0.1), (True, 0.1), (4, -0.1), (4, float("nan"))])
def test_straggler_wait_rejects_bad_input(n, spread):
    with pytest.raises(ValueError):
        straggler_wait_s(n, spread)
