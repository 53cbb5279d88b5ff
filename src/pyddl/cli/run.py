"""`pyddl run`: start N workers of a script on this machine with pyddl's environment."""

from __future__ import annotations

import argparse
import sys

from pyddl.launch.local import LaunchError, RunConfig, launch
from pyddl.runtime import ALGORITHMS

__all__ = ["register", "add_job_flags", "config_from_args"]


def add_job_flags(parser: argparse.ArgumentParser, default_np: int | None = None) -> None:
    """The flags every launching subcommand shares (run, bench, train)."""
    parser.add_argument("-np", "--nproc", type=int, default=default_np, metavar="N", help="number of workers")
    parser.add_argument("--topology", metavar="SPEC", help="dims innermost first, e.g. 2x2 (default: by server)")
    parser.add_argument("--allreduce", choices=ALGORITHMS, help="allreduce algorithm (default: native)")
    parser.add_argument("--timeout", type=float, metavar="S", help="seconds a collective may wait (default 300)")
    parser.add_argument("--chunk-bytes", type=int, metavar="B", help="multiring pipelining chunk (default 4 MiB)")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K", help="restart all workers up to K times")
    emu = parser.add_argument_group("emulated cluster (root; see docs/emulation.md)")
    emu.add_argument("--emulate-nodes", type=int, metavar="M",
                     help="run the workers on M emulated servers (network namespaces), N/M consecutive ranks each")
    emu.add_argument("--emulate-link-gbps", type=float, metavar="G",
                     help="limit each emulated server's link to G Gbit/s each way (default: unlimited)")
    emu.add_argument("--emulate-mtu", type=int, default=1500, metavar="BYTES",
                     help="emulated links' MTU: 1500 (default, commodity Ethernet) or 9000 (jumbo frames)")
    emu.add_argument("--emulate-pin", action="store_true",
                     help="pin each emulated server's ranks to its own CPU cores")


def config_from_args(args, command: tuple[str, ...]) -> RunConfig:
    """Build the RunConfig the job flags of `add_job_flags` describe, for `command`."""
    return RunConfig(
        nproc=args.nproc,
        command=command,
        topology=args.topology,
        allreduce=args.allreduce,
        timeout_s=args.timeout,
        chunk_bytes=args.chunk_bytes,
        max_restarts=args.max_restarts,
        emulate_nodes=args.emulate_nodes,
        emulate_link_gbps=args.emulate_link_gbps,
        emulate_pin=args.emulate_pin,
        emulate_mtu=args.emulate_mtu,
    )


def _main(args) -> int:
    command = tuple(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        launch(config_from_args(args, command))
    except ValueError as err:
        print(f"pyddl run: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="start N local workers of a script",
        description="Start N workers on this machine. Examples:\n"
        "  pyddl run -np 4 train.py --epochs 1\n"
        "  pyddl run -np 4 --topology 2x2 --allreduce multiring python -m mypkg.train\n"
        "  pyddl run -np 4 --emulate-nodes 2 --emulate-link-gbps 1 train.py   # as root",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(parser, default_np=1)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="script.py args... | python -m module args...")
    parser.set_defaults(func=_main)
