"""`pyddl bench step --framework tensorflow`: a Keras CNN alone, under pyddl.keras and under
TF's MultiWorkerMirroredStrategy on the same two workers, in one run."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.cli,
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs the tensorflow extra"),
]

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "pyddl.cli.main", "bench", "step", "--framework", "tensorflow", *args],
                          capture_output=True, text=True, timeout=280, cwd=tmp_path, env=ENV)


def test_tensorflow_step_bench_compares_pyddl_keras_with_mwms_and_one_worker(tmp_path):
    out = tmp_path / "tf.json"
    proc = _bench(tmp_path, "-np", "2", "--batch", "4", "--image-size", "16", "--steps", "2", "--warmup", "1",
                  "--rounds", "1", "--systems", "single,keras-noop,keras-pyddl,keras-mwms", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "comm eff" in proc.stdout and "keras-mwms" in proc.stdout
    data = json.loads(out.read_text())
    assert data["model"] == "small_cnn"
    rows = {r["system"]: r for r in data["rows"]}
    assert set(rows) == {"single", "keras-noop", "keras-pyddl", "keras-mwms"}
    assert rows["single"]["workers"] == 1 and rows["keras-mwms"]["workers"] == 2
    for name in ("keras-pyddl", "keras-mwms"):
        r, noop = rows[name], rows["keras-noop"]
        assert len(r["step_times_s"]) == 2 and r["median_step_s"] == pytest.approx(statistics.median(r["step_times_s"]))
        assert r["comm_efficiency"] == pytest.approx(noop["round_medians_s"][0] / r["round_medians_s"][0])
        assert r["scaling_efficiency"] == pytest.approx(r["images_per_s"] / (2 * rows["single"]["images_per_s"]))
        assert r["cpu_bound_comm_efficiency"] == pytest.approx(noop["median_step_s"] / (
            noop["median_step_s"] + r["ranks_per_core"] * max(0.0, r["comm_cpu_s"])))


def test_tensorflow_step_bench_refuses_a_torch_model_name(tmp_path):
    proc = _bench(tmp_path, "--model", "resnet18")
    assert proc.returncode == 2
    assert "--framework tensorflow times --model small_cnn or resnet50, got 'resnet18'" in proc.stderr
