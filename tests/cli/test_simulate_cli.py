"""`pyddl simulate` end to end: prediction table, JSON and PNG, calibration, validation, errors."""

import json
import os
import subprocess
import sys

import pytest

from pyddl.cli.main import main
from pyddl.sim.cost import Fabric, Level, allreduce_s

pytestmark = [pytest.mark.cli, pytest.mark.timeout(120)]

PYDDL = [sys.executable, "-m", "pyddl.cli.main", "simulate"]


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(PYDDL + args, cwd=cwd, capture_output=True, text=True, timeout=100, env=env)


def test_predicts_scaling_and_writes_json_and_png(tmp_path):
    proc = _run(["--model", "resnet18", "--batch", "32", "--cluster", "powerai-ddl-2017", "--gpus", "4,16,256",
                 "--algorithm", "native,multiring", "--json", "rows.json", "--plot", "eff.png"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "scaling_efficiency" in proc.stdout and "4x64" in proc.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["gpus"], r["algorithm"]) for r in rows] == [
        (g, a) for g in (4, 16, 256) for a in ("native", "multiring")]
    for r in rows:
        assert {"gpus", "algorithm", "step_s", "images_per_s", "scaling_efficiency"} <= r.keys()
        assert r["images_per_s"] == pytest.approx(r["gpus"] * 32 / r["step_s"])
        assert 0 < r["scaling_efficiency"] <= 1
    assert (tmp_path / "eff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_from_a_measured_step_profile(tmp_path, capsys):
    prof = str(tmp_path / "prof.json")
    assert main(["simulate", "--profile-step", prof, "--model", "resnet18", "--batch", "2",
                 "--image-size", "32", "--repeats", "1"]) == 0
    assert "step-time spread over the 1 repeats: 0.0000" in capsys.readouterr().out
    assert main(["simulate", "--step-profile", prof, "--cluster", "dgx-a100", "--gpus", "8,16",
                 "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "per-layer times: measured: cpu" in out
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 4
    assert main(["simulate", "--step-profile", prof, "--batch", "64"]) == 2
    assert "differs from the step profile's 2" in capsys.readouterr().err


@pytest.mark.parametrize("args, text", [
    (["--model", "resnet5O", "--gpus", "8"], "unknown model 'resnet5O': did you mean"),
    (["--cluster", "powerai-ddl-2018"], "unknown cluster 'powerai-ddl-2018'"),
    (["--gpus", "6"], "not a multiple of the 4 GPUs per server"),
    (["--gpus", "8,512"], "512 GPUs is more than cluster 'powerai-ddl-2017' has"),
    (["--gpus", "8,x"], "not a comma-separated list"),
    (["--algorithm", "native,ring2"], "unknown algorithm(s) ring2"),
    (["--algorithm", "hd", "--gpus", "12"], "power-of-two"),
    (["--write-cluster", "x.toml"], "add --calibrate BENCH"),
    (["--validate", "missing.json"], "bench file 'missing.json' does not exist"),
])
def test_user_errors_exit_2_with_a_clear_message(args, text, capsys):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyddl simulate: ") and text in err


def test_unknown_cluster_as_a_user_types_it(tmp_path):
    proc = _run(["--cluster", "nope"], tmp_path)
    assert proc.returncode == 2 and "shipped clusters: " in proc.stderr


TRUTH = Fabric((Level("in", 20e-6, 3e9), Level("out", 100e-6, 0.125e9)), (2, 2), 0.5e-9)


def _bench(path, truth=TRUTH):
    rows = [{"algorithm": alg, "bytes": 2**k, "dtype": "float32", "median_s": allreduce_s(truth, alg, 2**k)}
            for alg in ("native", "multiring", "auto") for k in range(10, 27, 2)]
    meta = {"world_size": 4, "dims": [2, 2], "backend": "gloo", "emulate": {"nodes": 2, "link_gbps": 1.0},
            "torch": "2.14.1"}
    path.write_text(json.dumps({"meta": meta, "rows": rows}))


def test_calibrate_write_cluster_then_validate_with_it(tmp_path):
    _bench(tmp_path / "bench.json")
    proc = _run(["--calibrate", "bench.json", "--write-cluster", "mine.toml", "--noise", "0.001",
                 "--json", "fit.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rate1 =" in proc.stdout and "27/27 rows within 15%" in proc.stdout
    fit = json.loads((tmp_path / "fit.json").read_text())
    rate1 = next(p for p in fit["fit"]["params"] if p["name"] == "rate1")
    assert rate1["value"] == pytest.approx(0.125e9, rel=1e-3) and rate1["identified"]
    (tmp_path / "steps.json").write_text(json.dumps([{"gpus": 4, "algorithm": "multiring", "step_s": 1.0}]))
    prof = tmp_path / "prof.json"
    grads = [{"name": f"g{i}", "numel": 1_000_000, "itemsize": 4, "ready_s": 0.1 * (i + 1), "dtype": "float32"}
             for i in range(5)]
    prof.write_text(json.dumps({"model": "toy", "batch": 8, "forward_s": 0.2, "backward_s": 0.5,
                                "optimizer_s": 0.01, "gradients": grads, "source": "hand", "image_size": None}))
    proc = _run(["--cluster", "mine.toml", "--validate", "bench.json", "--step-profile", "prof.json",
                 "--measured-steps", "steps.json", "--bucket-mb", "25", "--json", "check.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "allreduce: 27/27 rows within 15%" in proc.stdout
    assert "step time on fitted-2x2" in proc.stdout
    # One 20 MB bucket (cap 25 MiB), ready when backward ends: step = compute + its whole allreduce.
    step = json.loads((tmp_path / "check.json").read_text())["steps"][0]
    expect = 0.2 + 0.5 + 0.01 + allreduce_s(TRUTH, "multiring", 20_000_000)
    assert step["predicted_s"] == pytest.approx(expect, rel=1e-3) and step["ratio"] == step["predicted_s"]
    # A network twice as slow as the fitted one: every row is off by ~50%, and the exit code says so.
    slow = Fabric(tuple(Level(lv.name, 2 * lv.latency_s, lv.link_Bps / 2) for lv in TRUTH.levels), TRUTH.dims,
                  2 * TRUTH.gamma_s_per_byte)
    _bench(tmp_path / "slow.json", slow)
    proc = _run(["--cluster", "mine.toml", "--validate", "slow.json"], tmp_path)
    assert proc.returncode == 1 and "27 of 27 predictions are off by more than 15%" in proc.stderr
    # Three runs, one of them slow: each row is held against the median of its runs.
    proc = _run(["--cluster", "mine.toml", "--validate", "bench.json,slow.json,bench.json"], tmp_path)
    assert proc.returncode == 0 and "allreduce: 27/27 rows within 15%" in proc.stdout, proc.stderr


# ---- published results at the defaults (issue 22) --------------------------------------------


def test_anchors_table_and_exit_code(tmp_path):
    proc = _run(["--anchors", "--json", "anchors.json"], tmp_path)
    rows = json.loads((tmp_path / "anchors.json").read_text())
    names = [r["anchor"] for r in rows]
    assert names == ["Goyal et al. 2017, ResNet-50, 8 to 256 GPUs", "IBM DDL 2017, ResNet-50, ImageNet-1K",
                     "IBM DDL 2017, ResNet-101, ImageNet-22K"]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["#", "anchor", "published", "predicted", "difference"]
    for i, (r, line) in enumerate(zip(rows, lines[1:4]), 1):
        assert line.split()[0] == str(i) and r["anchor"] in line
        assert f"{100 * r['published']:.1f}%" in line and f"{100 * r['predicted']:.1f}%" in line
        assert r["difference_points"] == pytest.approx(100 * (r["predicted"] - r["published"]))
        assert f"{r['difference_points']:+.1f} pt" in line
        assert 0.5 < r["predicted"] < 1 and r["straggler_s"] > 0
        # Each published setup pays for its slowest worker; a term a setup does not have costs 0.
        assert r["term_points"]["slowest worker (step_cv)"] > 0
        assert r["term_points"]["fixed per-step costs"] == 0
    assert "points each term costs" in proc.stdout
    off = [r["anchor"] for r in rows if abs(r["difference_points"]) > 3]
    assert proc.returncode == (1 if off else 0), proc.stderr
    if off:
        assert f"{len(off)} of 3 published results are off by more than 3 points" in proc.stderr


@pytest.mark.parametrize("points, code", [(100.0, 0), (0.001, 1)])
def test_anchors_exit_code_follows_the_tolerance(points, code, monkeypatch, capsys):
    import pyddl.cli.simulate as sim

    monkeypatch.setattr(sim, "_ANCHOR_POINTS", points)
    assert main(["simulate", "--anchors"]) == code
    err = capsys.readouterr().err
    assert ("published results are off by more than" in err) == bool(code)


def test_defaults_use_the_clusters_stack(capsys):
    assert main(["simulate", "--cluster", "fb-big-basin-2017", "--gpus", "8,256", "--algorithm", "hd",
                 "--baseline-gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "buckets one per layer" in out and "host staging at 12 GB/s" in out and "step-time spread 0.01" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["8", "hd"], ["256", "hd"])]
    assert rows[0][5] == "1.000" and float(rows[1][5]) < 1  # efficiency against 8 GPUs


BAD_FILES = {
    "levels.toml": 'name = "x"\ngpus_per_server = 4\nservers = 2\nlevels = [1, 2]\n',
    "device.toml": 'device = 5\nname = "x"\ngpus_per_server = 4\nservers = 1\n[[levels]]\nname = "a"\n'
                   'link_gbps = 1.0\nlatency_us = 1.0\n',
    "slow.toml": 'name = "x"\ngpus_per_server = 4\nservers = 1\n[[levels]]\nname = "a"\n'
                 'link_gbps = 1e-300\nlatency_us = 1.0\n',
}


@pytest.mark.parametrize("args, names", [
    (["--anchors", "--model", "resnet18"], ["--anchors", "drop --model"]),
    (["--cluster", "levels.toml"], ["levels.toml", "levels", "[1, 2]"]),
    (["--cluster", "device.toml"], ["device.toml", "[device]", "got 5"]),
    (["--cluster", "slow.toml"], ["slow.toml", "link_gbps", "1e-300"]),
    (["--cluster", "adir"], ["adir", "is a directory"]),
    (["--num-classes", "0"], ["--num-classes", "got 0"]),
    (["--image-size", "-3"], ["--image-size", "got -3"]),
    (["--step-cv", "nan"], ["--step-cv", "got nan"]),
    (["--bucket-mb", "-1"], ["--bucket-mb", "got -1"]),
    (["--baseline-gpus", "0"], ["--baseline-gpus", "got 0"]),
    (["--batch", "0"], ["--batch", "got 0"]),
    (["--baseline-gpus", "6"], ["--baseline-gpus 6", "not a multiple of the 4 GPUs per server"]),
    (["--noise", "0"], ["--noise", "got 0.0"]),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, args, names):
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "adir").mkdir()
    proc = _run(args + ["--gpus", "4"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyddl simulate: ")
    for n in names:
        assert n in lines[0]
