"""The large-minibatch experiment: global batch 32 vs 256 on digits, with and without the recipe.

    python -m pyddl.train.experiment                 # 3 seeds x 4 runs of `pyddl train -np 2`
    python -m pyddl.train.experiment --seeds 0 --epochs 10 --out runs/lb-quick

A small replication of Goyal et al. 2017 (table 2 / figure 2): the same epochs at 8x the batch
(a) with the small batch's learning rate, (b) with the linearly scaled rate, (c) scaled plus
gradual warmup. Every run is a plain `pyddl train` command (listed in the report), so any row
can be rerun alone. Digits is small: one test image is 0.28 points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Arm", "arms", "command_for", "format_table", "main", "run_experiment"]

SMALL_BATCH, LARGE_BATCH = 32, 256


@dataclass(frozen=True)
class Arm:
    """One row of the table: a global batch and how its learning rate is set."""

    key: str
    label: str
    global_batch: int
    base_batch: int  # lr = base_lr x global_batch / base_batch
    warmup_epochs: float

    def lr(self, base_lr: float) -> float:
        """Return the peak learning rate of this arm."""
        return base_lr * self.global_batch / self.base_batch


def arms(warmup_epochs: float) -> list[Arm]:
    """Return the four runs: batch 32, then batch 256 (a) unscaled, (b) scaled, (c) + warmup."""
    return [
        Arm("small", f"batch {SMALL_BATCH} (reference)", SMALL_BATCH, SMALL_BATCH, 0.0),
        Arm("a", f"batch {LARGE_BATCH}, no recipe (lr of batch {SMALL_BATCH})", LARGE_BATCH,
            LARGE_BATCH, 0.0),
        Arm("b", f"batch {LARGE_BATCH}, linear scaling", LARGE_BATCH, SMALL_BATCH, 0.0),
        Arm("c", f"batch {LARGE_BATCH}, linear scaling + warmup", LARGE_BATCH, SMALL_BATCH,
            warmup_epochs),
    ]


def command_for(arm: Arm, seed: int, args, out: Path) -> list[str]:
    """Return the `pyddl train` command of one run (args: workers, epochs, base_lr)."""
    return ["pyddl", "train", "-np", str(args.workers), "--epochs", str(args.epochs),
            "--batch-size", str(arm.global_batch // args.workers), "--base-lr", str(args.base_lr),
            "--base-batch", str(arm.base_batch), "--warmup-epochs", str(arm.warmup_epochs),
            "--seed", str(seed), "--out", str(out), "--log-every", "60"]


def run_experiment(args) -> dict:
    """Run every arm for every seed (each a `pyddl train` subprocess); return the results.

    Raises:
        RuntimeError: a run failed (its log file is named).
    """
    root = Path(args.out)
    results = {"settings": {k: getattr(args, k) for k in ("workers", "epochs", "base_lr",
                                                            "warmup_epochs", "seeds")},
               "runs": []}
    for seed in args.seeds:
        for arm in arms(args.warmup_epochs):
            out = root / f"{arm.key}-seed{seed}"
            command = command_for(arm, seed, args, out)
            log = root / f"{arm.key}-seed{seed}.log"
            t0 = time.perf_counter()
            with open(log, "w") as fh:
                code = subprocess.call([sys.executable, "-m", "pyddl.cli.main", *command[1:]],
                                       stdout=fh, stderr=subprocess.STDOUT)
            if code != 0:
                raise RuntimeError(f"run {' '.join(command)} failed with exit code {code}; "
                                   f"see {log}")
            summary = json.loads((out / "summary.json").read_text())
            results["runs"].append({"arm": arm.key, "seed": seed, "command": " ".join(command),
                                    "test_top1": summary["test_top1"], "steps": summary["steps"],
                                    "wall_s": time.perf_counter() - t0})
            print(f"{arm.label}, seed {seed}: test top-1 {100 * summary['test_top1']:.2f}% "
                  f"({summary['steps']} steps, {time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def format_table(results: dict) -> str:
    """Render the results as a markdown table: mean and per-seed test top-1 of each arm."""
    s = results["settings"]
    rows = ["| run | global batch | peak lr | warmup epochs | steps | test top-1, mean "
            f"of {len(s['seeds'])} | per seed | vs batch {SMALL_BATCH} |",
            "|---|---|---|---|---|---|---|---|"]
    by_arm = {}
    for r in results["runs"]:
        by_arm.setdefault(r["arm"], []).append(r)
    reference = None
    for arm in arms(s["warmup_epochs"]):
        runs = by_arm.get(arm.key, [])
        if not runs:
            continue
        mean = 100 * statistics.fmean(r["test_top1"] for r in runs)
        reference = mean if reference is None else reference
        seeds = ", ".join(f"{100 * r['test_top1']:.2f}" for r in runs)
        delta = "" if arm.key == "small" else f"{mean - reference:+.2f}"
        rows.append(f"| {arm.label} | {arm.global_batch} | {arm.lr(s['base_lr']):g} | "
                    f"{arm.warmup_epochs:g} | {runs[0]['steps']} | {mean:.2f}% | {seeds} | "
                    f"{delta} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyddl.train.experiment", allow_abbrev=False,
        description="Global batch 32 vs 256 on digits: (a) no recipe, (b) linear scaling, "
        "(c) linear scaling + warmup; writes OUT/large-batch.md and .json.")
    parser.add_argument("-np", "--workers", type=int, default=2, metavar="N",
                        help="workers per run (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="epochs of every run (default %(default)s: digits at batch 256 "
                        "has 5 steps per epoch)")
    parser.add_argument("--base-lr", type=float, default=0.4,
                        help="lr of batch 32; batch 256 scaled gets 8x (default %(default)s, "
                        "so 3.2 at 256: Goyal et al.'s rate at 8k)")
    parser.add_argument("--warmup-epochs", type=float, default=5.0,
                        help="warmup of run (c) (default %(default)s, as Goyal et al.)")
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")],
                        default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", default=f"runs/large-batch-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="output folder (default: a new folder under ./runs)")
    args = parser.parse_args(argv)
    if args.workers < 1 or SMALL_BATCH % args.workers:
        parser.error(f"-np must divide the small global batch {SMALL_BATCH}, got {args.workers}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        parser.error(f"--warmup-epochs must be in [0, --epochs={args.epochs}], "
                     f"got {args.warmup_epochs}")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_experiment(args)
    table = format_table(results)
    settings = (f"{args.epochs} epochs of digits (1437 training, 360 test images), small CNN, "
                f"{args.workers} workers, SGD momentum 0.9, cosine decay after any warmup, "
                f"base lr {args.base_lr:g} at batch {SMALL_BATCH}, seeds "
                f"{', '.join(map(str, args.seeds))}; {time.perf_counter() - t0:.0f} s in all.")
    (root / "large-batch.json").write_text(json.dumps(results, indent=2) + "\n")
    (root / "large-batch.md").write_text(f"{table}\n\n{settings}\n")
    print(f"\n{table}\n\n{settings}\nwritten: {root}/large-batch.md, large-batch.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
