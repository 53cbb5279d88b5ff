"""Calibration: recover known parameters from rows the cost model generated; comparisons."""

import json
import random
from dataclasses import replace

import pytest

from pyddl.sim.calibrate import (
    BenchRun,
    compare_allreduce,
    compare_steps,
    fit_bench,
    fit_comm_cpu,
    fitted_cluster,
    load_bench,
    load_measured_steps,
    median_of_runs,
)
from pyddl.sim.cluster import cluster_to_toml, load_cluster
from pyddl.sim.cost import Fabric, Level, allreduce_s
from pyddl.sim.step import Gradient, StepProfile, predict_scaling

# The emulated bed: 2 servers x 2 ranks, loopback inside, a 1 Gbit/s link between; 300 us of
# host time per multiring stage and chunk.
TRUE = Fabric((Level("in", 20e-6, 3e9), Level("out", 100e-6, 0.125e9)), (2, 2), 0.5e-9, 300e-6)
TRUE_VALUES = {"alpha0": 20e-6, "rate0": 3e9, "alpha1": 100e-6, "rate1": 0.125e9, "gamma": 0.5e-9,
               "sigma": 300e-6}


def write_bench(path, fabric=TRUE, algorithms=("native", "multiring"), noise=0.0, seed=0, host=None):
    """Rows the cost model predicts on `fabric`; `host` = {"cpus", "ranks"} of the machine."""
    rng = random.Random(seed)
    load = max(1.0, host["ranks"] / host["cpus"]) if host else 1.0
    rows = []
    for alg in algorithms:
        for k in range(10, 27, 2):  # 1 KiB .. 64 MiB
            t = allreduce_s(fabric.with_host_load(load), alg, 2**k) * (1 + rng.uniform(-noise, noise))
            rows.append({"algorithm": alg, "bytes": 2**k, "dtype": "float32", "median_s": t, "min_s": t,
                         "algbw_gbps": 0, "busbw_gbps": 0, "bound_s": None, "bound_ratio": None})
    rows.append({"algorithm": "broadcast-ish", "bytes": 4096, "median_s": 1.0})  # not priced: skipped
    meta = {"world_size": fabric.size, "dims": list(fabric.dims), "backend": "gloo",
            "emulate": {"nodes": fabric.dims[-1], "link_gbps": 1.0}, "torch": "2.14.1"}
    if host:
        meta["host"] = host
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return str(path)


def test_recovers_known_parameters_from_exact_rows(tmp_path):
    # On 2x2 alone a multiring stage's host time and the inner latency are seen only as their
    # sum; 2 ranks in one server, where native and multiring differ by the stages, split them.
    inside = replace(TRUE, levels=TRUE.levels[:1], dims=(2,))
    runs = [load_bench(write_bench(tmp_path / "b.json")), load_bench(write_bench(tmp_path / "in.json", inside))]
    fit = fit_bench(runs, noise=1e-4)
    assert fit.rows_used == 36 and fit.rows_skipped == 2
    for p in fit.params:
        assert p.identified, p
        assert p.value == pytest.approx(TRUE_VALUES[p.name], rel=1e-3), p
    assert fit.rms_log_error < 1e-4


def test_rows_whose_samples_scatter_count_less(tmp_path):
    # On a shared machine small messages scatter (median 3x the fastest sample) while large
    # ones agree: the scattered rows, slowed 3x here, must not drag the fitted link rate.
    path = write_bench(tmp_path / "b.json")
    data = json.loads(open(path).read())
    for row in data["rows"]:
        if row.get("bytes", 0) <= 64 * 1024 and "min_s" in row:
            row["median_s"] *= 3
    open(path, "w").write(json.dumps(data))
    got = {p.name: p.value for p in fit_bench(load_bench(path), noise=0.02).params}
    assert got["rate1"] == pytest.approx(TRUE_VALUES["rate1"], rel=0.01)
    assert got["alpha1"] == pytest.approx(TRUE_VALUES["alpha1"], rel=0.1)
    for row in data["rows"]:  # without the bench's min_s every row counts alike:
        row.pop("min_s", None)
    open(path, "w").write(json.dumps(data))
    unweighted = {p.name: p.value for p in fit_bench(load_bench(path), noise=0.02).params}
    assert unweighted["alpha1"] > 2 * TRUE_VALUES["alpha1"]  # the slow small rows set the latency


def test_noisy_rows_pin_the_slow_link_and_flag_what_they_cannot_see(tmp_path):
    fit = fit_bench(load_bench(write_bench(tmp_path / "b.json", noise=0.02, seed=3)), noise=0.02)
    got = {p.name: p for p in fit.params}
    for name in ("alpha1", "rate1"):
        assert got[name].identified and got[name].value == pytest.approx(TRUE_VALUES[name], rel=0.05)
    for row in compare_allreduce(fit.fabric(), load_bench(str(tmp_path / "b.json"))):
        assert row["ratio"] == pytest.approx(1, abs=0.05)


def test_native_rows_alone_cannot_see_inside_a_server_nor_split_wire_from_reduction(tmp_path):
    # A flat ring's step is set by its slowest hop, the link between servers, and its time is
    # 2(P-1)/P S / rate1 + (P-1)/P S gamma: only that sum is seen, not its two terms.
    run = load_bench(write_bench(tmp_path / "b.json", algorithms=("native",)))
    fit = fit_bench(run, noise=0.01)
    got = {p.name: p for p in fit.params}
    assert not got["alpha0"].identified and not got["rate0"].identified
    assert not got["rate1"].identified and not got["gamma"].identified
    assert got["alpha1"].identified and got["alpha1"].value == pytest.approx(100e-6, rel=0.01)
    for row in compare_allreduce(fit.fabric(), run):
        assert row["ratio"] == pytest.approx(1, rel=0.01)


def test_fitted_cluster_round_trips_and_predicts_the_same(tmp_path):
    run = load_bench(write_bench(tmp_path / "b.json"))
    fit = fit_bench(run, noise=1e-4)
    cluster = fitted_cluster(fit, "fitted")
    path = tmp_path / "fitted.toml"
    path.write_text(cluster_to_toml(cluster))
    loaded = load_cluster(str(path))
    assert loaded.fabric(4).dims == (2, 2) and loaded.multiring_pipeline == fit.pipeline
    for row in compare_allreduce(loaded.fabric(4), run, pipeline=loaded.multiring_pipeline):
        assert row["ratio"] == pytest.approx(1, rel=1e-3)


def test_compare_rejects_a_different_rank_count(tmp_path):
    run = load_bench(write_bench(tmp_path / "b.json"))
    with pytest.raises(ValueError, match="pass --gpus 4"):
        compare_allreduce(load_cluster("powerai-ddl-2017").fabric(8), run)


def test_several_runs_of_one_layout_are_held_as_their_median_per_row(tmp_path):
    runs = [load_bench(write_bench(tmp_path / f"b{i}.json", noise=0.2, seed=i)) for i in range(3)]
    merged = median_of_runs(runs)
    assert merged.dims == (2, 2) and merged.path == ",".join(r.path for r in runs)
    for i, row in enumerate(merged.rows):
        times = sorted(r.rows[i]["median_s"] for r in runs)
        assert row["median_s"] == times[1] and row["min_s"] == times[0]
        assert (row["algorithm"], row["bytes"]) == (runs[0].rows[i]["algorithm"], runs[0].rows[i]["bytes"])
    assert median_of_runs(runs[:1]) is runs[0]
    other = load_bench(write_bench(tmp_path / "1x4.json", fabric=replace(TRUE, dims=(1, 4))))
    with pytest.raises(ValueError, match="ran different layouts .*2x2 and 1x4"):
        median_of_runs([runs[0], other])
    fewer = load_bench(write_bench(tmp_path / "native.json", algorithms=("native",)))
    with pytest.raises(ValueError, match="hold different rows"):
        median_of_runs([runs[0], fewer])


@pytest.mark.parametrize("content, text", [
    ("[1, 2]", "needs the keys 'meta'"),
    ('{"meta": {"world_size": 4, "dims": [3, 2]}, "rows": []}', "multiply to it"),
    ('{"meta": {"world_size": 2, "dims": [2]}, "rows": [{"algorithm": "native"}]}', "row 0 lacks bytes"),
    ('{"meta": {"world_size": 2, "dims": [2]}, "rows": [{"algorithm": "native", "bytes": 4, "median_s": 1, '
     '"dtype": "float16"}]}', "row 0 moved float16; calibrate on float32 rows"),
    ("not json", "not JSON"),
])
def test_bad_bench_files(tmp_path, content, text):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=text):
        load_bench(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_bench(str(tmp_path / "missing.json"))


def test_too_few_rows_for_the_parameters(tmp_path):
    path = tmp_path / "few.json"
    path.write_text(json.dumps({"meta": {"world_size": 4, "dims": [2, 2]},
                                "rows": [{"algorithm": "native", "bytes": 1024, "median_s": 1e-3}]}))
    with pytest.raises(ValueError, match="usable rows"):
        fit_bench(load_bench(str(path)))


def _toy_step():
    from pyddl.sim.step import Gradient, StepProfile

    # One 4 MB gradient, ready when backward (0.5 s) ends: all of its allreduce is exposed.
    grads = (Gradient("w", 1_000_000, 4, 0.5),)
    return StepProfile("toy", 8, 0.2, 0.5, 0.1, grads, "hand")


def _toy_cluster():
    from pyddl.sim.cluster import Cluster, LevelSpec

    # 2 GPUs per server, 2 servers; the link between servers 1 Gbit/s, no latency.
    return Cluster("toy", 2, 2, (LevelSpec("in", 1000.0, 0.0), LevelSpec("out", 1.0, 0.0)))


def test_measured_steps_pair_with_predictions(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"rows": [{"world_size": 2, "algorithm": "native", "step_s": 1.2}]}))
    measured = load_measured_steps(str(path))
    assert measured == [{"gpus": 2, "algorithm": "native", "step_s": 1.2}]
    # 2 GPUs in one server: the ring crosses the fast link only (4 MB at 1000 Gbit/s = 32 us).
    (row,) = compare_steps(_toy_step(), _toy_cluster(), measured, bucket_bytes=2**30)
    expect = 0.8 + 4e6 / (1000e9 / 8)
    assert row["topology"] == "2x1" and row["predicted_s"] == pytest.approx(expect, rel=1e-9)
    assert row["ratio"] == pytest.approx(expect / 1.2) and row["measured_s"] == 1.2
    path.write_text(json.dumps([{"gpus": 2, "algorithm": "native"}]))
    with pytest.raises(ValueError, match="row 0 needs gpus"):
        load_measured_steps(str(path))


def test_measured_steps_from_a_bench_carry_the_layout_and_the_compute_of_the_same_run(tmp_path):
    path = tmp_path / "scaling.json"
    rows = [{"system": s, "workers": w, "median_step_s": t} for s, w, t in [
        ("single", 1, 0.9), ("ddp", 2, 1.6), ("pyddl-native", 2, 1.3), ("pyddl-multiring", 2, 1.2),
        ("pyddl-multiring-fp16", 2, 1.0), ("pyddl-noop", 2, 1.0)]]
    path.write_text(json.dumps({"model": "resnet18", "ranks_per_server": 1, "rows": rows}))
    measured = load_measured_steps(str(path))
    assert measured == [
        {"gpus": 2, "algorithm": "native", "step_s": 1.3, "compute_s": 1.0, "gpus_per_server": 1},
        {"gpus": 2, "algorithm": "multiring", "step_s": 1.2, "compute_s": 1.0, "gpus_per_server": 1}]
    # One GPU per server: the 4 MB ring crosses the 1 Gbit/s link, each rank sending half of
    # it twice (reduce-scatter, allgather): 2 x 2 MB / 125 MB/s = 32 ms; the compute (0.8 s in
    # the profile) is scaled to the measured 1.0 s, so the gradient is ready at 0.625 s.
    native, _ = compare_steps(_toy_step(), _toy_cluster(), measured, bucket_bytes=2**30)
    wire = 2 * 2e6 / 125e6
    assert native["topology"] == "1x2"
    assert native["predicted_s"] == pytest.approx(1.0 + wire, rel=1e-6)
    assert native["predicted_comm_s"] == pytest.approx(wire, rel=1e-6)
    assert native["measured_comm_s"] == pytest.approx(0.3)
    path.write_text(json.dumps({"rows": rows[:2]}))
    with pytest.raises(ValueError, match="no pyddl-native, pyddl-multiring or pyddl-auto rows"):
        load_measured_steps(str(path))


def test_simple_layouts_calibrate_a_prediction_for_a_layout_never_fitted(tmp_path):
    # Fit on 2 ranks in one server and on 1 rank on each of 2 servers; predict 2 x 2, where
    # the two ranks of a server share its link and the multiring pipelines two levels.
    inside = replace(TRUE, levels=TRUE.levels[:1], dims=(2,))
    across = replace(TRUE, dims=(1, 2))
    runs = [load_bench(write_bench(tmp_path / "in.json", inside)),
            load_bench(write_bench(tmp_path / "across.json", across))]
    fit = fit_bench(runs, noise=1e-3)
    assert fit.dims == (2, 2)
    held_out = load_bench(write_bench(tmp_path / "2x2.json", TRUE))
    for row in compare_allreduce(fit.fabric(held_out.dims), held_out):
        assert row["ratio"] == pytest.approx(1, rel=0.01), row
    # Emulated on one 2-core machine, 2x2 puts 2 ranks on each core: its host work (stages,
    # reductions) takes twice as long, and the prediction must know it from the bench file.
    crowded = load_bench(write_bench(tmp_path / "2x2-crowded.json", TRUE, host={"cpus": 2, "ranks": 4}))
    assert crowded.host_load == 2.0 and held_out.host_load == 1.0
    for row in compare_allreduce(fit.fabric(crowded.dims), crowded):
        assert row["ratio"] == pytest.approx(1, rel=0.01), row
    slower = [r["measured_s"] / h["measured_s"] for r, h in zip(compare_allreduce(fit.fabric((2, 2)), crowded),
                                                                compare_allreduce(fit.fabric((2, 2)), held_out))]
    assert max(slower) > 1.05


def test_runs_on_different_backends_cannot_share_a_fit(tmp_path):
    a = load_bench(write_bench(tmp_path / "a.json"))
    b = BenchRun(**{**a.__dict__, "path": "b.json", "backend": "nccl"})
    with pytest.raises(ValueError, match="different backends"):
        fit_bench([a, b])


def test_communication_cpu_is_fitted_per_algorithm_from_runs_across_servers(tmp_path):
    # cpu = a + b x bytes per algorithm, from a run with one rank per server and a core each.
    def with_cpu(name, dims, costs, host=None, backend="gloo"):
        path = write_bench(tmp_path / name, replace(TRUE, levels=TRUE.levels[: len(dims)], dims=dims), host=host)
        data = json.loads(open(path).read())
        data["meta"]["backend"] = backend
        for row in data["rows"]:
            if row["algorithm"] in costs:
                a, b = costs[row["algorithm"]]
                row["cpu_s"] = a + b * row["bytes"]
        open(path, "w").write(json.dumps(data))
        return load_bench(path)

    truth = {"native": (300e-6, 1.5e-9), "multiring": (900e-6, 2.5e-9)}
    across = with_cpu("across.json", (1, 2), truth)
    got = fit_comm_cpu([across])
    for alg, (a, b) in truth.items():
        assert (got[alg].per_call_us * 1e-6, got[alg].per_byte_ns * 1e-9) == pytest.approx((a, b), rel=1e-6)
    # Runs inside one server, with more ranks than cores, or on NCCL say nothing about it.
    assert fit_comm_cpu([with_cpu("in.json", (2,), truth)]) == {}
    assert fit_comm_cpu([with_cpu("crowded.json", (2, 2), truth, host={"cpus": 2, "ranks": 4})]) == {}
    assert fit_comm_cpu([with_cpu("gpu.json", (1, 2), truth, backend="nccl")]) == {}
    # A cluster fitted with it charges the step for it; without it, nothing.
    fit = fit_bench([across], noise=1e-3)
    profile = StepProfile("toy", 8, 0.5, 3.0, 0.25, tuple(Gradient(f"g{i}", 2**18, 4, t) for i, t in enumerate((1, 2, 3))),
                          "hand")
    with_it, without = (predict_scaling(profile, fitted_cluster(fit, "f", c), [2], ["native"], 2**20)[0]
                        for c in (got, None))
    assert with_it["comm_cpu_s"] == pytest.approx(3 * (300e-6 + 1.5e-9 * 2**20))
    assert without["comm_cpu_s"] == 0.0
    assert with_it["step_s"] > without["step_s"]
