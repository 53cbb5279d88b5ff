"""`pyddl bench`: measure collectives and training steps.

`pyddl bench allreduce -np 4` launches itself on 4 local workers; inside a job started by
`pyddl run` (or torchrun, srun, mpirun) it runs on that job's ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyddl.cli.run import add_job_flags, config_from_args
from pyddl.launch.local import LaunchError, launch

__all__ = ["register"]


def _in_job() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def _relaunch(args, argv_tail: list[str]) -> int:
    """Start this same bench on args.nproc local workers."""
    command = (sys.executable, "-m", "pyddl.cli.main", "bench", *argv_tail)
    try:
        launch(config_from_args(args, command))
    except ValueError as err:
        print(f"pyddl bench: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    return 0


def _allreduce(args) -> int:
    from pyddl.bench import allreduce as bench
    from pyddl.runtime import ALGORITHMS

    try:
        sizes = [bench.parse_size(s) for s in args.sizes.split(",")]
    except ValueError as err:
        print(f"pyddl bench allreduce: {err}", file=sys.stderr)
        return 2
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        print(f"pyddl bench allreduce: unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}", file=sys.stderr)
        return 2
    if not _in_job():
        tail = ["allreduce", "--sizes", args.sizes, "--algorithms", args.algorithms,
                "--iters", str(args.iters), "--warmup", str(args.warmup)]
        if args.json:
            tail += ["--json", os.path.abspath(args.json)]
        if args.link_gbps:
            tail += ["--link-gbps", str(args.link_gbps)]
        return _relaunch(args, tail)
    bench.main(sizes, algorithms, args.iters, args.warmup, args.json, args.link_gbps)
    return 0


def _step(args) -> int:
    import json
    import tempfile

    from pyddl.bench import step as bench
    from pyddl.launch.local import RunConfig

    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in systems if x not in bench.SYSTEMS]
    if unknown:
        print(f"pyddl bench step: unknown system(s) {', '.join(unknown)}; choose from {', '.join(bench.SYSTEMS)}", file=sys.stderr)
        return 2
    knobs = (args.model, args.batch, args.image_size, args.steps, args.warmup, args.bucket_mb)
    if args.out:  # a worker of a job this command started
        bench.worker_main(args.out, systems, *knobs)
        return 0
    if _in_job():
        print("pyddl bench step launches its own jobs (one worker alone, then -np N); run it outside pyddl run", file=sys.stderr)
        return 2
    if args.nproc < 2:
        print("pyddl bench step: -np must be at least 2 (it compares N workers with one alone)", file=sys.stderr)
        return 2

    def command(which: list[str], out: str) -> tuple[str, ...]:
        return (sys.executable, "-m", "pyddl.cli.main", "bench", "step", "--systems", ",".join(which),
                "--model", args.model, "--batch", str(args.batch), "--image-size", str(args.image_size),
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--bucket-mb", str(args.bucket_mb),
                "--out", out)

    rows = []
    threads = str(max(1, (os.cpu_count() or 1) // args.nproc))
    with tempfile.TemporaryDirectory(prefix="pyddl-bench-") as tmp:
        try:
            print(f"one worker alone ({args.model}, batch {args.batch}, {args.image_size} px, {threads} thread(s)):", flush=True)
            single = command(["single"], os.path.join(tmp, "single.json"))
            if getattr(args, "emulate_pin", False):
                single = ("taskset", "-c", "0", *single)  # as pinned as one emulated server's rank
            launch(RunConfig(nproc=1, command=single, timeout_s=args.timeout, extra_env={"OMP_NUM_THREADS": threads}))
            print(f"{args.nproc} workers:", flush=True)
            launch(config_from_args(args, command([x for x in systems if x != "single"], os.path.join(tmp, "job.json"))))
        except ValueError as err:
            print(f"pyddl bench step: {err}", file=sys.stderr)
            return 2
        except LaunchError as err:
            print(str(err), file=sys.stderr)
            return err.exit_code
        for name in ("single.json", "job.json"):
            with open(os.path.join(tmp, name)) as fh:
                rows.extend(json.load(fh))
    rows = bench.summarize(rows)
    print(bench.format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "batch_per_worker": args.batch, "image_size": args.image_size,
                       "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark collectives and training steps")
    which = parser.add_subparsers(dest="bench", metavar="BENCH")
    which.required = True
    ar = which.add_parser(
        "allreduce",
        help="allreduce time, algbw and busbw per size and algorithm",
        description="Examples:\n  pyddl bench allreduce -np 4 --sizes 1M,16M,64M\n"
        "  pyddl run -np 4 --topology 2x2 pyddl bench allreduce --algorithms native,multiring",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(ar, default_np=4)
    ar.add_argument("--sizes", default="1M,16M,64M", help="comma-separated sizes (K/M/G = KiB/MiB/GiB)")
    ar.add_argument("--algorithms", default="native,multiring,auto", help="comma-separated algorithms")
    ar.add_argument("--iters", type=int, default=5, help="timed repetitions per size (median reported)")
    ar.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    ar.add_argument("--link-gbps", type=float, help="servers' NIC rate for the bound (set by emulation)")
    ar.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ar.set_defaults(func=_allreduce)

    from pyddl.bench.step import default_systems

    st = which.add_parser(
        "step",
        help="training-step time: one worker, torch DDP and pyddl side by side",
        description="Example:\n  pyddl bench step --model resnet18 --batch 32 --image-size 112 -np 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(st, default_np=2)
    st.add_argument("--model", default="resnet18", help="small_cnn or a torchvision classifier")
    st.add_argument("--batch", type=int, default=32, help="images per worker per step")
    st.add_argument("--image-size", type=int, default=112)
    st.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    st.add_argument("--warmup", type=int, default=2)
    st.add_argument("--bucket-mb", type=float, default=0.0,
                    help="gradient bucket size for DDP and pyddl alike (default: each system's own default)")
    st.add_argument("--systems", default=",".join(["single"] + default_systems()), help="comma-separated systems")
    st.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    st.add_argument("--out", help=argparse.SUPPRESS)
    st.set_defaults(func=_step)
