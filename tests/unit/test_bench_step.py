"""The step bench's derived figures: efficiencies against each baseline, the thread table."""

import math
import random
import statistics
import threading

import pytest

from pyddl.bench.step import (SYSTEMS, default_systems, exposed_ratio_interval, format_exposed, format_table,
                              format_threads, judge, ranks_per_core, summarize, thread_cpu_s)


def _row(system, rounds):
    return {"system": system, "workers": 2, "median_step_s": sorted(rounds)[len(rounds) // 2],
            "images_per_s": 64 / rounds[0], "round_medians_s": rounds}


def test_each_family_against_its_own_noop_and_all_against_the_bare_model():
    rows = {r["system"]: r for r in summarize([
        _row("ddp-fp16", [1.20, 1.30, 1.25]), _row("ddp-noop", [1.10, 1.20, 1.15]),
        _row("pyddl-multiring-fp16", [1.15, 1.25, 1.20]), _row("pyddl-noop", [1.00, 1.10, 1.05])])}
    ddp, pyddl = rows["ddp-fp16"], rows["pyddl-multiring-fp16"]
    assert ddp["comm_efficiency"] == pytest.approx(1.15 / 1.25)  # median of 1.1/1.2, 1.2/1.3, 1.15/1.25
    assert ddp["plain_efficiency"] == pytest.approx(1.05 / 1.25)
    assert pyddl["plain_efficiency"] == pyddl["comm_efficiency"] == pytest.approx(1.05 / 1.20)
    assert rows["ddp-noop"]["plain_efficiency"] < 1 < rows["ddp-noop"]["comm_efficiency"] + 1e-9


def _passes(system, steps):
    """A row of one run whose i-th step ran in pass i (the median of each 2 passes as a round)."""
    return {**_row(system, [statistics.median(steps[i:i + 2]) for i in range(0, len(steps), 2)]),
            "median_step_s": statistics.median(steps), "step_times_s": steps}


def test_exposed_communication_against_the_bare_model_and_ddp_at_the_same_wire_precision():
    # The machine drifts from pass to pass; every system's step in a pass drifts alike.
    drift = [0.0, 0.09, -0.04, 0.17, 0.03, -0.08]
    rows = judge(summarize([
        _passes(system, [2.30 + d + extra for d in drift])
        for system, extra in [("ddp", 0.63), ("ddp-fp16", 0.26), ("ddp-bf16", 0.30), ("ddp-noop", 0.12),
                              ("pyddl-multiring", 0.40), ("pyddl-multiring-fp16", 0.19),
                              ("pyddl-native-bf16-nocheck", 0.18), ("pyddl-noop", 0.0)]]))
    by = {r["system"]: r for r in rows}
    assert by["ddp"]["exposed_s"] == pytest.approx(0.63)
    assert by["pyddl-multiring"]["exposed_s"] == pytest.approx(0.40)
    assert by["pyddl-multiring"]["exposed_vs_ddp"] == pytest.approx(0.40 / 0.63)
    assert by["pyddl-multiring-fp16"]["exposed_vs_ddp"] == pytest.approx(0.19 / 0.26)  # against ddp-fp16
    # Paired pass by pass, the drift cancels: every resample gives the same ratio.
    assert by["pyddl-multiring"]["exposed_vs_ddp_ci"] == pytest.approx((0.40 / 0.63, 0.40 / 0.63))
    assert "exposed_s" not in by["ddp-noop"] and "exposed_vs_ddp" not in by["ddp"]
    assert "exposed_vs_ddp" not in by["ddp-bf16"]  # DDP's own rows are the peers, not compared
    assert by["pyddl-native-bf16-nocheck"]["exposed_vs_ddp"] == pytest.approx(0.18 / 0.30)  # against ddp-bf16
    text = format_exposed(rows)
    assert "pyddl-multiring            x2       400 ms  0.63x ddp's (0.63-0.63)" in text
    assert "pyddl-multiring-fp16       x2       190 ms  0.73x ddp-fp16's (0.73-0.73)" in text
    assert "exposed_vs_ddp_unreliable" not in by["pyddl-multiring"] and "!" not in text
    assert format_exposed(summarize([_row("ddp", [1.0]), _row("ddp-noop", [0.9])])) == ""


def test_without_passes_exposed_communication_is_the_difference_of_the_medians():
    rows = summarize([_row("ddp", [2.90, 3.00, 2.95]), _row("pyddl-multiring", [2.70, 2.74, 2.72]),
                      _row("pyddl-noop", [2.30, 2.35, 2.32])])
    by = {r["system"]: r for r in rows}
    assert by["pyddl-multiring"]["exposed_vs_ddp"] == pytest.approx(0.40 / 0.63)
    assert "exposed_vs_ddp_ci" not in by["pyddl-multiring"]


def _noisy_bed(passes, seed, sd=0.3):
    """Steps of a busy 2-core bed: a 3 s bare model, DDP exposing 0.6 s and the multiring 0.36 s
    (0.6x), each step with its own noise of `sd` seconds and every pass a shared drift."""
    rng = random.Random(seed)
    rows = {"pyddl-noop": [], "ddp": [], "pyddl-multiring": []}
    for _ in range(passes):
        drift = rng.uniform(-0.5, 0.5)
        for system, exposed in (("pyddl-noop", 0.0), ("ddp", 0.6), ("pyddl-multiring", 0.36)):
            rows[system].append(3.0 + drift + exposed + rng.gauss(0, sd))
    return rows


def test_the_interval_holds_the_true_ratio_and_narrows_with_more_passes():
    few, many = _noisy_bed(12, seed=3), _noisy_bed(240, seed=3)
    lo_few, hi_few = exposed_ratio_interval(few["pyddl-noop"], few["ddp"], few["pyddl-multiring"])
    lo_many, hi_many = exposed_ratio_interval(many["pyddl-noop"], many["ddp"], many["pyddl-multiring"])
    assert lo_few < 0.6 < hi_few and lo_many < 0.6 < hi_many
    assert hi_many - lo_many < (hi_few - lo_few) / 2
    assert hi_many - lo_many < 0.3
    # The interval is the same every time: its resampling has a fixed seed.
    assert exposed_ratio_interval(few["pyddl-noop"], few["ddp"], few["pyddl-multiring"]) == (lo_few, hi_few)


def test_the_interval_is_unbounded_where_ddp_may_expose_nothing():
    plain, ddp, multiring = [3.0, 3.1, 3.0, 3.2], [3.1, 3.1, 3.3, 3.1], [3.1, 3.2, 3.1, 3.3]
    lo, hi = exposed_ratio_interval(plain, ddp, multiring)
    assert hi == math.inf and lo > 0
    rows = judge(summarize([_passes("pyddl-noop", plain), _passes("ddp", ddp), _passes("pyddl-multiring", multiring)]))
    row = next(r for r in rows if r["system"] == "pyddl-multiring")
    assert row["exposed_vs_ddp_ci"] == (lo, None)  # JSON has no infinity
    assert row["exposed_vs_ddp_unreliable"] == f"90% interval {lo:.2f}-unbounded"


def test_an_exposed_ratio_known_no_better_than_half_its_value_is_not_a_result():
    # The 0.5 Gbit/s bed on a busy day: 12 passes of steps that scatter by 0.3 s.
    bed = _noisy_bed(12, seed=3)
    rows = judge(summarize([_passes(system, steps) for system, steps in bed.items()]))
    by = {r["system"]: r for r in rows}
    lo, hi = by["pyddl-multiring"]["exposed_vs_ddp_ci"]
    assert hi - lo > 0.5 * by["pyddl-multiring"]["exposed_vs_ddp"]
    assert by["pyddl-multiring"]["exposed_vs_ddp_unreliable"] == f"90% interval {lo:.2f}-{hi:.2f}"
    text = format_exposed(rows).splitlines()
    assert text[-3].endswith(f"x ddp's ({lo:.2f}-{hi:.2f}) !")
    assert text[-1] == f"!   pyddl-multiring x2: 90% interval {lo:.2f}-{hi:.2f}"
    # Twenty times the passes pin it down: a result, though its row's rounds of two passes
    # still disagree (the ratio, paired pass by pass, does not move with them).
    bed = _noisy_bed(240, seed=3)
    rows = judge(summarize([_passes(system, steps) for system, steps in bed.items()]))
    multiring = next(r for r in rows if r["system"] == "pyddl-multiring")
    assert multiring["unreliable"] and "exposed_vs_ddp_unreliable" not in multiring
    lo, hi = multiring["exposed_vs_ddp_ci"]
    assert f"ddp's ({lo:.2f}-{hi:.2f})" in format_exposed(rows) and "not a result" not in format_exposed(rows)
    assert not format_exposed(rows).splitlines()[-1].endswith("!")


def test_rows_whose_rounds_disagree_or_that_beat_their_baseline_are_not_results():
    # What a busy machine printed for `pyddl bench scaling`: one-worker rounds 3104/1120/3346 ms.
    single = {**_row("single", [3.104, 1.120, 3.346]), "workers": 1, "images_per_s": 32 / 3.104}
    rows = judge(summarize([single, _row("ddp", [1.50, 1.52, 1.49]), _row("ddp-noop", [1.40, 1.41, 1.40]),
                            _row("pyddl-multiring", [1.30, 1.31, 1.30]), _row("pyddl-noop", [1.40, 1.41, 1.40])]))
    by = {r["system"]: r for r in rows}
    assert by["single"]["unreliable"] == ["its rounds disagree by 72%"]
    assert by["ddp"]["unreliable"] == ["scaling efficiency 2.07 is above 1",
                                       "the one-worker row it scales against is unreliable"]
    assert "comm efficiency 1.08 is above 1" in by["pyddl-multiring"]["unreliable"]  # faster than no communication
    table = format_table(rows).splitlines()
    assert table[2].endswith(" !") and table[-1].startswith("!   pyddl-noop x2: ")
    steady = judge(summarize([_row("ddp", [1.50, 1.52, 1.49]), _row("ddp-noop", [1.40, 1.41, 1.40])]))
    assert [r["unreliable"] for r in steady] == [[], []]
    assert not format_table(steady).splitlines()[-1].startswith("!")


def test_ranks_per_core_counts_the_most_crowded_machine():
    both = frozenset({0, 1})
    assert ranks_per_core([("box", both)] * 4) == 2.0  # the emulated 2x2 bed: 4 ranks, 2 cores
    assert ranks_per_core([("box", {0}), ("box", {0}), ("box", {1}), ("box", {1})]) == 2.0  # --emulate-pin
    assert ranks_per_core([("box", {0}), ("box", {1})]) == 1.0  # one rank per server, pinned
    assert ranks_per_core([("a", frozenset(range(8))), ("b", frozenset(range(8)))]) == 1.0  # never under 1
    assert ranks_per_core([("a", both), ("a", both), ("b", {0}), ("b", {0}), ("b", {0})]) == 3.0
    assert ranks_per_core([("a", {0, 1, 2})] * 4) == pytest.approx(4 / 3)


def test_cpu_ceiling_counts_communication_cpu_once_per_rank_sharing_the_core():
    # The 0.5 Gbit/s bed of 2026-12-07: bare model 3284 ms, the multiring's communication
    # 203 ms of CPU per rank, 4 ranks on 2 cores; its measured comm eff was 0.887.
    rows = [{**_row("pyddl-multiring", [3.655]), "cpu_s_per_step": 1.8031, "ranks_per_core": 2.0},
            {**_row("pyddl-noop", [3.284]), "cpu_s_per_step": 1.6}]
    multiring = summarize(rows)[0]
    assert multiring["comm_cpu_s"] == pytest.approx(0.2031)
    assert multiring["cpu_bound_comm_efficiency"] == pytest.approx(3.284 / (3.284 + 2 * 0.2031))  # 0.890
    assert "cpu ceiling counts communication's CPU 2 times" in format_table(summarize(rows))
    alone = summarize([{**rows[0], "ranks_per_core": 1.0}, rows[1]])
    assert alone[0]["cpu_bound_comm_efficiency"] == pytest.approx(3.284 / (3.284 + 0.2031))
    assert "counts communication's CPU" not in format_table(alone)


def test_thread_table_lists_busy_threads_and_the_idle_rest():
    text = format_threads([{"system": "pyddl-multiring", "median_step_s": 1.2,
                            "rank0_thread_cpu_s_per_step": {"MainThread": 1.08, "pyddl-engine": 0.04,
                                                            "pyddl-heartbeat": 0.0001}}])
    assert text.splitlines()[1].split() == ["pyddl-multiring", "MainThread", "1080", "pyddl-engine", "40",
                                            "|", "idle", "80"]
    assert format_threads([{"system": "ddp", "median_step_s": 1.0}]) == ""


def test_thread_cpu_names_python_threads():
    done = threading.Event()
    worker = threading.Thread(target=done.wait, name="pyddl-engine[x]")
    worker.start()
    try:
        cpu = thread_cpu_s()
    finally:
        done.set()
        worker.join()
    assert "MainThread" in cpu and "pyddl-engine[x]" in cpu and all(v >= 0 for v in cpu.values())


def test_default_systems_leave_the_named_only_variants_out():
    chosen = default_systems()
    assert "ddp-fp16" in chosen and "pyddl-native-fp16" in chosen and "pyddl-noop" in chosen
    assert "single" not in chosen  # its own job, run when named
    assert set(SYSTEMS) - set(chosen) == {"single", "ddp-bf16", "pyddl-native-bf16", "pyddl-native-fp16-nocheck",
                                          "pyddl-native-bf16-nocheck", "pyddl-multiring-nocheck", "ddp-on-pyddl", "fsdp2",
                                          "fsdp2-on-pyddl"}
