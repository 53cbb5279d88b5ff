"""Progress and results of a training run: progress line, metrics.jsonl, plot, summary.

Only rank 0 reports. The progress line redraws in place on a terminal and prints one plain line
every `every_s` seconds otherwise (logs, CI). JSON is written strictly: NaN and Inf become null.
matplotlib is imported only when a plot is drawn, on the Agg canvas (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import torch

__all__ = [
    "METRIC_KEYS",
    "SUMMARY_KEYS",
    "MetricsWriter",
    "ProgressBar",
    "format_duration",
    "plot_curves",
    "read_metrics",
    "summary_text",
    "topk_correct",
    "write_summary",
]

METRIC_KEYS = ("epoch", "loss", "top1", "top5", "images_per_s", "global_batch", "lr", "wall_s")
SUMMARY_KEYS = ("test_top1", "test_top5", "images_per_s", "epochs", "global_batch", "workers",
                "wall_s")


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Count the samples whose label is among the k highest logits, for each k.

    Counts (not fractions) so ranks can sum them with one allreduce. A k above the number
    of classes counts every sample, as top-5 of a 3-class problem is trivially right.

    Args:
        logits: (batch, classes).
        targets: (batch,) class indices.
        ks: the k values.

    Returns:
        One count per k.

    Example:
        >>> topk_correct(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), (1, 2))
        [1, 2]
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (batch, classes) and targets (batch,), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        return [0 for _ in ks]
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(targets[:, None])
    return [int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]


def format_duration(seconds: float) -> str:
    """Format seconds as H:MM:SS, or M:SS under an hour; "?" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Rank 0's progress: step, images/s, loss, lr and ETA over `total_steps`.

    Steps count the whole run; start_step > 0 when resuming, so the ETA uses this session's
    pace only. Ranks other than 0 pass enabled=False and print nothing.

    Example:
        >>> bar = ProgressBar(total_steps=1000, enabled=(rank == 0))
        >>> bar.update(step=1, images=256, loss=2.3, lr=0.1)
        >>> bar.close()
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True,
                 stream: TextIO | None = None,
                 every_s: float = 10.0, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, width: int = 24):
        if total_steps < 1 or every_s < 0 or not 0 <= start_step <= total_steps:
            raise ValueError(
                f"need total_steps >= 1, 0 <= start_step <= total_steps and every_s >= 0, got "
                f"{total_steps}, {start_step}, {every_s}"
            )
        self.total_steps, self.start_step = total_steps, start_step
        self.enabled, self.every_s, self.width = enabled, every_s, width
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = tty if tty is not None else bool(isatty and isatty())
        self.clock = clock
        self.start = self.last_print = clock()
        self.images = 0
        self.printed = False

    def line(self, step: int, loss: float, lr: float) -> str:
        """Return the progress text at `step` (no newline)."""
        elapsed = self.clock() - self.start
        rate = self.images / elapsed if elapsed > 0 else float("nan")
        done = step - self.start_step  # a resumed run's earlier steps took no time here
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        filled = int(self.width * min(step, self.total_steps) / self.total_steps)
        bar = "#" * filled + "." * (self.width - filled)
        return (f"[{bar}] step {step}/{self.total_steps}  {rate:,.1f} img/s  loss {loss:.4f}  "
                f"lr {lr:.4g}  elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}")

    def update(self, step: int, images: int, loss: float, lr: float) -> None:
        """Record `images` processed in the step that completed `step` and maybe print.

        On a TTY the line is redrawn every call; otherwise one line every `every_s` seconds,
        and always at the last step.
        """
        self.images += images
        if not self.enabled:
            return
        now = self.clock()
        if self.tty:
            self.stream.write("\r" + self.line(step, loss, lr))
            self.printed = True
        elif now - self.last_print >= self.every_s or step >= self.total_steps:
            self.stream.write(self.line(step, loss, lr) + "\n")
            self.last_print = now
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line on a TTY."""
        if self.enabled and self.tty and self.printed:
            self.stream.write("\n")
            self.stream.flush()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _check_keys(record: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{what} is missing {', '.join(missing)}; it needs {', '.join(keys)}")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read metrics.jsonl records, skipping a torn last line left by a crash."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Append one JSON object per epoch to metrics.jsonl, flushed line by line.

    With resume_epoch=k the file is first rewritten to keep only epochs < k, so a resumed run
    does not list an epoch twice.
    """

    def __init__(self, path: str | os.PathLike, resume_epoch: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("epoch", math.inf) < resume_epoch]
            self.path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's record; it must have every key of METRIC_KEYS.

        Raises:
            ValueError: a required key is missing.
        """
        _check_keys(record, METRIC_KEYS, "metrics record")
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(dict(record)), allow_nan=False) + "\n")
            f.flush()


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """Write summary.json; it must have every key of SUMMARY_KEYS.

    Raises:
        ValueError: a required key is missing.
    """
    _check_keys(summary, SUMMARY_KEYS, "summary")
    Path(path).write_text(json.dumps(_clean(dict(summary)), indent=2, allow_nan=False) + "\n")


def summary_text(summary: Mapping[str, Any]) -> str:
    """Return a one-paragraph plain-text account of a run's summary.json."""
    _check_keys(summary, SUMMARY_KEYS, "summary")

    def pct(v):
        return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"

    model = f" {summary['model']}" if "model" in summary else ""
    data = f" on {summary['data']}" if "data" in summary else ""
    return (
        f"Trained{model}{data} for {summary['epochs']} epochs on {summary['workers']} workers "
        f"at a global batch of {summary['global_batch']} in {format_duration(summary['wall_s'])} "
        f"({summary['images_per_s']:,.1f} images/s): test top-1 {pct(summary['test_top1'])}"
        + ("" if summary["test_top5"] is None else f", top-5 {pct(summary['test_top5'])}") + "."
    )


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Draw loss, accuracy, learning rate and throughput per epoch into a PNG at `path`.

    Raises:
        ValueError: no records.
        ImportError: matplotlib is not installed.
    """
    if not records:
        raise ValueError("no metrics records to plot; train at least one epoch")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the curves plot needs matplotlib: pip install matplotlib") from exc

    def series(key):
        return [float("nan") if r.get(key) is None else r[key] for r in records]

    epochs = series("epoch")
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0][0], "loss", [("loss", "train loss")]),
        (axes[0][1], "accuracy", [("top1", "top-1"), ("top5", "top-5")]),
        (axes[1][0], "learning rate", [("lr", "lr")]),
        (axes[1][1], "images/s", [("images_per_s", "images/s")]),
    ]
    for ax, title, lines in panels:
        for key, label in lines:
            ax.plot(epochs, series(key), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    fig.savefig(path, dpi=100)
