"""`pyddl train` as a user types it: the default run end to end (shortened to 2 epochs) and
every bad-input error, each caught before any worker starts (in-job failures: tests/multiproc)."""

import json
import os
import subprocess
import sys

import pytest

from pyddl.cli.main import main

pytestmark = [pytest.mark.cli, pytest.mark.timeout(120)]

PYDDL = [sys.executable, "-m", "pyddl.cli.main"]
DIGITS_TEST_IMAGES, DIGITS_CLASSES = 360, 10


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(PYDDL + args, cwd=cwd, capture_output=True, text=True, timeout=110,
                          env=env)


def test_default_train_end_to_end(tmp_path):
    # The real default (2 workers, 5 epochs), only told where to write.
    proc = _run(["train", "--out", "run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["workers"], summary["global_batch"], summary["epochs"]) == (2, 64, 5)
    assert summary["steps"] == 5 * (1437 // 64)
    assert summary["test_top1"] > 0.95  # the promise for the default run
    assert summary["test_top5"] >= summary["test_top1"]
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["test_top1"] * DIGITS_TEST_IMAGES == pytest.approx(
        round(summary["test_top1"] * DIGITS_TEST_IMAGES))  # a count of test images
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["top1"] == summary["test_top1"]
    assert (out / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt"))[-1] == "ckpt-000005.pt"
    assert "[rank0] Trained small_cnn on digits for 5 epochs on 2 workers" in proc.stdout
    assert "[rank1]" not in proc.stdout  # only rank 0 reports


def test_large_batch_options_train_end_to_end(tmp_path):
    # The recipe's options for very large batches, through the real command: LARS, a batch
    # ramp (the lr follows the batch), label smoothing, fp16 on the wire, the multiring.
    proc = _run(["train", "--epochs", "3", "--optimizer", "lars", "--base-lr", "1.0", "--batch-ramp", "0:32,1:64,2:128",
                 "--label-smoothing", "0.1", "--compression", "fp16", "--allreduce", "multiring",
                 "--out", "run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_batch"] for r in records] == [32, 64, 128]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_batch"] == 128 and summary["test_top1"] > 0.5  # chance is 0.1


def _fails(args, capsys, cwd):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyddl train: ") and err.count("\n") == 1  # one line, no traceback
    return err


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would land under ./runs


def test_missing_and_empty_data_folders(tmp_path, capsys):
    err = _fails(["--data", str(tmp_path / "nope")], capsys, tmp_path)
    assert f"data folder '{tmp_path / 'nope'}' does not exist or is not a folder" in err
    (tmp_path / "empty").mkdir()
    err = _fails(["--data", str(tmp_path / "empty")], capsys, tmp_path)
    assert "train/ folder" in err and "needs" in err and "/train and" in err
    for split in ("train", "val"):
        (tmp_path / "empty" / split).mkdir()
    err = _fails(["--data", str(tmp_path / "empty")], capsys, tmp_path)
    assert f"no class folders in '{tmp_path / 'empty' / 'train'}'" in err
    for split in ("train", "val"):
        (tmp_path / "empty" / split / "cat").mkdir()
    err = _fails(["--data", str(tmp_path / "empty")], capsys, tmp_path)
    assert "put at least one image in every class folder" in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_unknown_model(tmp_path, capsys):
    err = _fails(["--model", "resnet05"], capsys, tmp_path)
    assert "unknown model 'resnet05'; did you mean" in err and "resnet50" in err


def test_batch_too_big_for_the_data_set(tmp_path, capsys):
    err = _fails(["--batch-size", "1000"], capsys, tmp_path)
    assert ("global batch 2000 at epoch 0 is larger than the 1437 training samples" in err
            and "lower --batch-size" in err)


def test_checkpoints_are_never_overwritten_or_imagined(tmp_path, capsys):
    err = _fails(["--resume", "--out", "fresh"], capsys, tmp_path)
    assert "--resume: no checkpoint in fresh/checkpoints" in err and "drop --resume" in err
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "ckpt-000003.pt").write_bytes(b"an earlier run")
    err = _fails(["--out", "old"], capsys, tmp_path)
    assert "old/checkpoints already holds checkpoints of a run (ckpt-000003.pt); pass --resume" in err
    assert (tmp_path / "old" / "checkpoints" / "ckpt-000003.pt").read_bytes() == b"an earlier run"


def test_bad_flag_values_are_one_line_errors(tmp_path, capsys):
    err = _fails(["-np", "3", "--batch-ramp", "0:64"], capsys, tmp_path)
    assert "--batch-ramp batches [64] are not divisible by 3 workers" in err
    err = _fails(["-np", "2", "--topology", "2x2"], capsys, tmp_path)
    assert "world size 2 does not match topology 2x2" in err
