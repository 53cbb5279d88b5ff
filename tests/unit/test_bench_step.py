"""The step bench's derived figures: efficiencies against each baseline, the thread table."""

import threading

import pytest

from pyddl.bench.step import (SYSTEMS, default_systems, format_exposed, format_table, format_threads, judge,
                              ranks_per_core, summarize, thread_cpu_s)


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


def test_exposed_communication_against_the_bare_model_and_ddp_at_the_same_wire_precision():
    rows = judge(summarize([
        _row("ddp", [2.90, 3.00, 2.95]), _row("ddp-fp16", [2.60, 2.55, 2.58]), _row("ddp-noop", [2.40, 2.45, 2.42]),
        _row("pyddl-multiring", [2.70, 2.74, 2.72]), _row("pyddl-multiring-fp16", [2.52, 2.50, 2.51]),
        _row("pyddl-noop", [2.30, 2.35, 2.32])]))
    by = {r["system"]: r for r in rows}
    # Per round: ddp 0.60/0.65/0.63 s over the bare model, the multiring 0.40/0.39/0.40.
    assert by["ddp"]["exposed_s"] == pytest.approx(0.63)
    assert by["pyddl-multiring"]["exposed_s"] == pytest.approx(0.40)
    assert by["pyddl-multiring"]["exposed_vs_ddp"] == pytest.approx(0.40 / 0.63)
    assert by["pyddl-multiring-fp16"]["exposed_vs_ddp"] == pytest.approx(0.19 / 0.26)  # against ddp-fp16
    assert "exposed_s" not in by["ddp-noop"] and "exposed_vs_ddp" not in by["ddp"]
    text = format_exposed(rows)
    assert "pyddl-multiring            x2       400 ms  0.63x ddp's" in text
    assert "pyddl-multiring-fp16       x2       190 ms  0.73x ddp-fp16's" in text
    assert format_exposed(summarize([_row("ddp", [1.0]), _row("ddp-noop", [0.9])])) == ""
    # Per round the multiring exposed 0.67/0.60/0.63 of DDP's: within a quarter, a result.
    assert by["pyddl-multiring"]["exposed_vs_ddp_by_round"] == pytest.approx([0.40 / 0.60, 0.39 / 0.65, 0.40 / 0.63])
    assert "exposed_vs_ddp_unreliable" not in by["pyddl-multiring"] and "!" not in text


def test_an_exposed_ratio_whose_rounds_disagree_is_not_a_result():
    # A run of the 0.5 Gbit/s bed on a busy day: every step's rounds within 7%, yet the
    # multiring's exposed communication was 1.06x, 0.60x and 1.20x DDP's in its three rounds.
    rows = judge(summarize([_row("ddp", [3.055, 3.083, 3.065]), _row("pyddl-multiring", [3.089, 2.909, 3.165]),
                            _row("pyddl-noop", [2.476, 2.643, 2.567])]))
    by = {r["system"]: r for r in rows}
    assert by["pyddl-multiring"]["unreliable"] == [] and by["ddp"]["unreliable"] == []
    assert by["pyddl-multiring"]["exposed_vs_ddp_unreliable"] == "its rounds against DDP's disagree: 1.06/0.60/1.20"
    text = format_exposed(rows).splitlines()
    assert text[2].endswith("x ddp's !") and not text[1].endswith("!")
    assert text[-1] == "!   pyddl-multiring x2: its rounds against DDP's disagree: 1.06/0.60/1.20"


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
