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
