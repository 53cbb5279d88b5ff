"""The allreduce bench's arithmetic: sizes, the link bound of DESIGN.md, the printed table."""

import pytest
import torch

from pyddl.bench.allreduce import bound_s, calls_per_sample, format_table, parse_dtype
from pyddl.bench.options import parse_size, parse_tensors


def test_sizes_are_binary_units():
    assert [parse_size(s) for s in ("4K", "64M", "1G", "512", "2MiB", "1.5K")] == [
        4096, 64 * 2**20, 2**30, 512, 2 * 2**20, 1536]
    with pytest.raises(ValueError, match="not a number"):
        parse_size("12Q")


def test_dtypes_by_name_or_short_name():
    assert [parse_dtype(s) for s in ("float32", "FP16", "bf16", "float16")] == [
        torch.float32, torch.float16, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="'int64' is not one of float32, float16, bfloat16"):
        parse_dtype("int64")


def test_bound_is_2_m_minus_1_over_m_times_bytes_over_link_rate():
    s = 64 * 2**20
    assert bound_s(s, 2, 1.0) == pytest.approx(s * 8 / 1e9)  # 2 servers: S / B, 537 ms
    assert bound_s(s, 4, 10.0) == pytest.approx(1.5 * s * 8 / 10e9)
    assert bound_s(s, 1, 1.0) == 0.0  # one server has no link between servers to bound by


def test_table_shows_the_bound_and_the_ratio_when_the_link_is_known():
    row = {"algorithm": "multiring", "tensor": "fresh", "bytes": 64 * 2**20, "median_s": 0.6, "cpu_s": 0.25,
           "algbw_gbps": 0.89, "busbw_gbps": 1.34, "spread": 0.05, "unreliable": False,
           "bound_s": bound_s(64 * 2**20, 2, 1.0), "bound_ratio": bound_s(64 * 2**20, 2, 1.0) / 0.6}
    table = format_table([row, {**row, "algorithm": "native", "bound_s": None, "bound_ratio": None}])
    first, second = table.splitlines()[2:]
    assert first.split() == ["64M", "multiring", "fresh", "600.00", "250.00", "0.890", "1.340", "536.87", "0.89", "0.05"]
    assert second.split()[-3:] == ["-", "-", "0.05"]


def test_rows_whose_repeats_disagree_or_that_beat_physics_are_marked_unreliable():
    from pyddl.bench.allreduce import SPREAD_LIMIT, _row

    steady = _row("multiring", 64 * 2**20, "float32", (0.6, 0.59, 0.2, 1, 0.05), 4, 2, 1.0)
    noisy = _row("multiring", 64 * 2**20, "float32", (0.6, 0.4, 0.2, 1, SPREAD_LIMIT + 0.01), 4, 2, 1.0)
    too_fast = _row("multiring", 64 * 2**20, "float32", (0.5, 0.5, 0.2, 1, 0.0), 4, 2, 1.0)  # bound: 537 ms
    assert [r["unreliable"] for r in (steady, noisy, too_fast)] == [False, True, True]
    lines = format_table([steady, noisy, too_fast]).splitlines()
    assert [line.endswith(" !") for line in lines[2:5]] == [False, True, True]
    assert lines[-1].startswith("! unreliable: the samples' interquartile range is over 25% of their median")
    assert not format_table([steady]).splitlines()[-1].startswith("!")


def test_tensor_kinds_by_name():
    assert parse_tensors("fresh, out") == ["fresh", "out"]
    with pytest.raises(ValueError, match="choose from reused, fresh, out"):
        parse_tensors("new")


def test_short_calls_are_timed_back_to_back_long_ones_alone():
    assert calls_per_sample(0.001) == 20  # 20 ms per sample
    assert calls_per_sample(0.0003) == 64  # capped
    assert calls_per_sample(0.007) == 3
    assert calls_per_sample(0.02) == calls_per_sample(0.5) == 1
    assert calls_per_sample(0.0) == 64  # a call too fast for the clock


@pytest.mark.timeout(10)
def test_bound_with_racks_is_the_largest_level_bound():
    from pyddl.bench.allreduce import bound_levels_s

    s, b = 64 * 2**20, 8 / 1e9  # S bytes; x b = seconds at 1 Gbit/s
    # 8 ranks on 4 servers at 1 Gbit/s in 2 racks with 1 Gbit/s uplinks: the servers' links
    # carry 2(M-1)/M = 1.5 S each, the uplinks 2(R-1)/R = 1 S: the links bound it.
    assert bound_levels_s(s, 4, 1.0, 2, 1.0) == pytest.approx(max(2 * 3 / 4, 2 * 1 / 2) * s * b)
    # An uplink of 0.25 Gbit/s (4:1 oversubscribed against its 2 servers' 1 Gbit/s) dominates.
    assert bound_levels_s(s, 4, 1.0, 2, 0.25) == pytest.approx(1 * s * b / 0.25)
    assert bound_levels_s(s, 8, 1.0, 4, 0.5) == pytest.approx(max(2 * 7 / 8, 2 * 3 / 4 / 0.5) * s * b)
    # No racks, one rack or unlimited uplinks: the 2-level bound exactly.
    for racks, rack_gbps in ((1, None), (1, 0.1), (2, None)):
        assert bound_levels_s(s, 4, 1.0, racks, rack_gbps) == bound_s(s, 4, 1.0)
    assert bound_levels_s(s, 4, 1.0) == bound_s(s, 4, 1.0)
    # Unlimited server links: the uplinks alone; nothing limited: no bound.
    assert bound_levels_s(s, 4, None, 2, 1.0) == pytest.approx(s * b)
    assert bound_levels_s(s, 4, None) == 0.0 and bound_levels_s(s, 1, 1.0) == 0.0


@pytest.mark.timeout(10)
def test_rows_under_racks_carry_the_level_bound():
    from pyddl.bench.allreduce import _row, bound_levels_s

    s, measured = 64 * 2**20, (2.0, 2.0, 0.2, 1, 0.05)
    row = _row("multiring", s, "float32", measured, 8, 4, 1.0, racks=2, rack_gbps=0.25)
    assert row["bound_s"] == bound_levels_s(s, 4, 1.0, 2, 0.25) == pytest.approx(s * 8 / 0.25e9)
    assert row["bound_ratio"] == pytest.approx(row["bound_s"] / 2.0)
    # A reduce-scatter moves half the bytes on every level.
    half = _row("rs/gloo", s, "float32", measured, 8, 4, 1.0, half=True, racks=2, rack_gbps=0.25)
    assert half["bound_s"] == pytest.approx(row["bound_s"] / 2)
    # Racks with unlimited server links still have a bound: the uplinks'.
    assert _row("native", s, "float32", measured, 8, 4, None, racks=2, rack_gbps=1.0)["bound_s"] == pytest.approx(
        s * 8 / 1e9)
    assert _row("native", s, "float32", measured, 8, 4, None)["bound_s"] is None
