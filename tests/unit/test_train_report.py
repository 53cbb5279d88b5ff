"""Progress line, metrics.jsonl, summary, plot and top-k accuracy."""

import io
import json

import pytest
import torch

from pyddl.train.report import (
    METRIC_KEYS, MetricsWriter, ProgressBar, format_duration, plot_curves, read_metrics,
    summary_text, topk_correct, write_summary,
)


def test_topk_correct_hand_example():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    targets = torch.tensor([1, 1, 0, 2])
    # top-1 picks 1, 0, 2, 2: right for rows 0 and 3; top-2 adds row 1 (0.2 is second).
    assert topk_correct(logits, targets, (1, 2, 3)) == [2, 3, 4]
    assert topk_correct(logits, targets, (5,)) == [4]        # k above the class count
    assert topk_correct(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == [0, 0]
    with pytest.raises(ValueError, match=r"expected logits \(batch, classes\)"):
        topk_correct(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_format_duration():
    assert format_duration(59.6) == "1:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_plain_lines_every_n_seconds():
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar(10, stream=out, every_s=3, tty=False, clock=clock)
    for step in range(1, 11):
        clock.t = float(step)
        bar.update(step, images=100, loss=1.0 / step, lr=0.1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4                                   # at 3, 6, 9 s and the last step
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("[") and "step 3/10" in lines[0]
    assert "100.0 img/s" in lines[0] and "loss 0.3333" in lines[0] and "lr 0.1" in lines[0]
    assert "elapsed 0:03" in lines[0] and "ETA 0:07" in lines[0]
    assert "step 10/10" in lines[-1] and "ETA 0:00" in lines[-1]


def test_progress_tty_redraws_in_place():
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar(4, stream=out, tty=True, clock=clock)
    for step in (1, 2):
        clock.t = step * 2.0
        bar.update(step, images=8, loss=0.5, lr=0.01)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "4.0 img/s" in text


def test_progress_resumed_eta_and_disabled_rank():
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar(100, start_step=50, stream=out, every_s=0, tty=False, clock=clock)
    clock.t = 10.0
    bar.update(60, images=10, loss=0.1, lr=0.1)
    assert "ETA 0:40" in out.getvalue()                    # 10 steps in 10 s, 40 left
    silent = io.StringIO()
    quiet = ProgressBar(5, enabled=False, stream=silent, every_s=0, tty=False)
    quiet.update(5, 1, 0.0, 0.0)
    quiet.close()
    assert silent.getvalue() == ""
    with pytest.raises(ValueError, match="start_step <= total_steps"):
        ProgressBar(5, start_step=6)


def _record(epoch, **kw):
    r = dict(epoch=epoch, loss=1.0 / (epoch + 1), top1=0.5 + epoch / 10, top5=0.9,
             images_per_s=1000.0, global_batch=64, lr=0.025, wall_s=3.0 * (epoch + 1))
    r.update(kw)
    return r


def test_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for e in range(3):
        w.write(_record(e, loss=float("nan") if e == 2 else 1.0))
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert set(METRIC_KEYS) <= set(records[0]) and records[2]["loss"] is None
    with pytest.raises(ValueError, match="metrics record is missing top5"):
        w.write({k: 0 for k in METRIC_KEYS if k != "top5"})


def test_metrics_resume_drops_epochs_redone_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for e in range(4):
        w.write(_record(e))
    with open(path, "a") as f:
        f.write('{"epoch": 4, "lo')                          # a crash mid-line
    assert [r["epoch"] for r in read_metrics(path)] == [0, 1, 2, 3]
    w = MetricsWriter(path, resume_epoch=2)
    w.write(_record(2, top1=0.99))
    assert [(r["epoch"], r["top1"]) for r in read_metrics(path)] == [(0, 0.5), (1, 0.6), (2, 0.99)]
    MetricsWriter(path)
    assert read_metrics(path) == []


def test_summary_json_and_paragraph(tmp_path):
    summary = dict(test_top1=0.9861, test_top5=0.9994, images_per_s=1234.5, epochs=5,
                   global_batch=64, workers=2, wall_s=75.2, model="small_cnn", data="digits")
    write_summary(tmp_path / "summary.json", summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    text = summary_text(summary)
    assert "\n" not in text
    for part in ("small_cnn on digits", "5 epochs", "2 workers", "global batch of 64", "1:15",
                 "1,234.5 images/s", "top-1 98.61%", "top-5 99.94%"):
        assert part in text
    with pytest.raises(ValueError, match="summary is missing workers"):
        write_summary(tmp_path / "s.json", {k: v for k, v in summary.items() if k != "workers"})


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "curves.png"
    plot_curves([_record(e) for e in range(3)] + [_record(3, top5=None)], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no metrics records to plot"):
        plot_curves([], path)
