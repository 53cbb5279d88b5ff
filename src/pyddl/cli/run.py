"""`pyddl run`: start the workers of a script, on this machine, on N servers, or as a scheduler's rank.

`-np N` alone: N workers here. `-H`/`--hostfile`: every listed server over ssh (or another
--launcher). `--nnodes/--node-rank/--master-addr`: this server's share, as torchrun does it.
No -np inside `srun` or `mpirun`: the scheduler started one process per rank, so this one runs
the command directly as its rank; in an sbatch script or salloc shell, it starts itself through
srun. docs/launch.md has the details.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Mapping

from pyddl.launch.hosts import DEFAULT_LAUNCHER, parse_hostfile, parse_hosts
from pyddl.launch.config import LaunchError, RunConfig, parse_rdzv_conf
from pyddl.launch.local import launch, worker_command
from pyddl.config import ALGORITHM_CHOICES, Settings

__all__ = ["register", "add_job_flags", "config_from_args", "scheduler_mode", "launch_mode", "run_through_srun"]


def _nnodes(text: str) -> tuple[int, int | None]:
    lo, sep, hi = text.partition(":")
    try:
        return (int(lo), int(hi) if sep else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX (e.g. 2 or 1:4), got {text!r}") from None


def _rdzv_conf(text: str) -> tuple:
    try:
        return parse_rdzv_conf(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_job_flags(parser: argparse.ArgumentParser, default_np: int | None = None) -> None:
    """The flags every launching subcommand shares (run, bench, train); the settings' flags
    default to the launcher's PYDDL_* environment, else to Settings' defaults."""
    default = Settings()
    parser.add_argument("-np", "--nproc", type=int, default=default_np, metavar="N",
                        help="number of workers (with --nnodes: on this server)")
    parser.add_argument("--topology", metavar="SPEC", help="dims innermost first, e.g. 2x2 (default: by server)")
    parser.add_argument("--allreduce", choices=ALGORITHM_CHOICES,
                        help=f"allreduce algorithm (default: {default.allreduce})")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help=f"seconds a collective may wait (default {default.timeout_s:g})")
    parser.add_argument("--chunk-bytes", type=int, metavar="B",
                        help=f"multiring pipelining chunk (default {default.chunk_bytes} = "
                             f"{default.chunk_bytes / 2**20:g} MiB)")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K", help="restart all workers up to K times")
    srv = parser.add_argument_group("several servers (see docs/launch.md)")
    srv.add_argument("-H", "--hosts", metavar="H1:S,H2:S",
                     help="start the workers on these servers, S slots each, ranks filling them in order")
    srv.add_argument("--hostfile", metavar="FILE", help="servers, one `host slots=S` per line (instead of -H)")
    srv.add_argument("--launcher", default=DEFAULT_LAUNCHER, metavar="CMD",
                     help=f"how to run a command on a server (default: {DEFAULT_LAUNCHER!r} + host); a "
                          "template may place {host} and {node}, e.g. 'ip netns exec pyddl0s{node}'")
    srv.add_argument("--nnodes", type=_nnodes, default=(1, None), metavar="N|MIN:MAX",
                     help="this job's number of servers; MIN:MAX for an elastic job (c10d rendezvous)")
    srv.add_argument("--node-rank", type=int, metavar="I", help="this server's index (0 hosts the rendezvous)")
    srv.add_argument("--master-addr", metavar="ADDR",
                     help="node 0's address; its rendezvous store listens there only")
    srv.add_argument("--master-port", type=int, metavar="PORT", help="the rendezvous port (default 29500)")
    srv.add_argument("--rdzv-conf", type=_rdzv_conf, default=(), metavar="K=N,...",
                     help="c10d rendezvous options of --nnodes MIN:MAX, as torchrun's (seconds): "
                          "last_call_timeout (30), keep_alive_interval (5), keep_alive_max_attempt (3), "
                          "join_timeout (600), ...")
    srv.add_argument("--network-interface", metavar="IFACE",
                     help="interface of the data path (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
    srv.add_argument("--exit-with-stdin", action="store_true",
                     help="stop the workers when stdin closes (set by the -H driver on each server)")
    emu = parser.add_argument_group("emulated cluster (root; see docs/emulation.md)")
    emu.add_argument("--emulate-nodes", type=int, metavar="M",
                     help="run the workers on M emulated servers (network namespaces), N/M consecutive ranks each")
    emu.add_argument("--emulate-link-gbps", type=float, metavar="G",
                     help="limit each emulated server's link to G Gbit/s each way (default: unlimited)")
    emu.add_argument("--emulate-mtu", type=int, default=1500, metavar="BYTES",
                     help="emulated links' MTU: 1500 (default, commodity Ethernet) or 9000 (jumbo frames)")
    emu.add_argument("--emulate-pin", action="store_true",
                     help="pin each emulated server's ranks to its own CPU cores")
    emu.add_argument("--emulate-racks", type=int, metavar="R",
                     help="put the emulated servers in R racks, M/R consecutive servers each, joined by a spine "
                          "(default: one switch for all)")
    emu.add_argument("--emulate-rack-gbps", type=float, metavar="G2",
                     help="limit each rack's uplink to the spine to G2 Gbit/s each way (default: unlimited)")


def _hosts(args) -> tuple:
    if args.hosts and args.hostfile:
        raise ValueError("give the servers once: -H or --hostfile, not both")
    if args.hostfile:
        try:
            with open(args.hostfile, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise ValueError(f"--hostfile {args.hostfile}: {err.strerror}; give a readable file") from None
        try:
            text = data.decode()
            binary = "it holds NUL bytes" if "\0" in text else ""
        except UnicodeDecodeError as err:
            binary = f"byte 0x{data[err.start]:02x} at offset {err.start} is not UTF-8"
        if binary:
            raise ValueError(f"--hostfile {args.hostfile}: not a text file ({binary}); give a file of "
                             f"`host slots=N` lines")
        return parse_hostfile(text, args.hostfile)
    return parse_hosts(args.hosts) if args.hosts else ()


def config_from_args(args, command: tuple[str, ...]) -> RunConfig:
    """Build the RunConfig the job flags of `add_job_flags` describe, for `command`.

    Raises:
        ValueError: unreadable hostfile, bad host list, or a flag RunConfig rejects.
    """
    hosts = _hosts(args)
    nproc = args.nproc
    if nproc is None:
        nproc = sum(h.slots for h in hosts) if hosts else 1
    nnodes, max_nnodes = args.nnodes
    return RunConfig(
        nproc=nproc,
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
        emulate_racks=args.emulate_racks,
        emulate_rack_gbps=args.emulate_rack_gbps,
        nnodes=nnodes,
        max_nnodes=max_nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_conf=args.rdzv_conf,
        network_interface=args.network_interface,
        hosts=hosts,
        launcher=args.launcher,
        exit_with_stdin=args.exit_with_stdin,
    )


def scheduler_mode(env: Mapping[str, str]) -> str | None:
    """Say what a `pyddl run` with no -np is inside a scheduler.

    Returns:
        "rank": one process of a job step (srun task, mpirun rank): run the command as it;
        "allocation": an sbatch script or salloc shell (no step yet): start through srun;
        None: no scheduler (or torchrun, which sets RANK itself).
    """
    if "RANK" in env:
        return None
    if any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_STEP_NUM_TASKS")):
        return "rank"
    if "SLURM_JOB_ID" in env:
        return "allocation"
    return None


def _run_as_rank(cfg: RunConfig) -> int:
    env = {**os.environ, **cfg.worker_env()}
    executable, args = worker_command(cfg.command)
    os.execvpe(executable, [executable, *args], env)
    return 127  # not reached: exec replaced this process


def run_through_srun(subcommand: str) -> int:
    """Start `pyddl <subcommand>` with this process's arguments as one srun task per rank."""
    argv = sys.argv[sys.argv.index(subcommand) + 1:] if subcommand in sys.argv else []
    srun = shutil.which("srun")
    if srun is None:
        raise ValueError(f"inside a SLURM allocation with no job step, pyddl {subcommand} starts itself with "
                         f"srun, which is not on PATH; run `srun pyddl {subcommand} ...` or give -np")
    # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others waiting.
    os.execv(srun, [srun, "--kill-on-bad-exit=1", sys.executable, "-u", "-m", "pyddl.cli.main", subcommand, *argv])
    return 127


def launch_mode(args) -> str | None:
    """scheduler_mode() for a command with job flags: None when the flags ask for a launch
    (-np, hosts, --nnodes, emulation) rather than leaving the ranks to the scheduler."""
    single = args.nproc is None and not (args.hosts or args.hostfile) and args.nnodes == (1, None)
    return scheduler_mode(os.environ) if single and not args.emulate_nodes else None


def _main(args) -> int:
    command = tuple(args.command)
    if command and command[0] == "--":
        command = command[1:]
    mode = launch_mode(args)
    try:
        cfg = config_from_args(args, command)
        if mode == "rank":
            return _run_as_rank(cfg)
        if mode == "allocation":
            return run_through_srun("run")
        launch(cfg)
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
        help="start the workers of a script (here, on several servers, or under srun/mpirun)",
        description="Start the workers of a script. Examples:\n"
        "  pyddl run -np 4 train.py --epochs 1\n"
        "  pyddl run -np 4 --topology 2x2 --allreduce multiring python -m mypkg.train\n"
        "  pyddl run -np 8 -H node1:4,node2:4 train.py            # over ssh\n"
        "  pyddl run -np 4 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 train.py   # per server\n"
        "  srun -N 2 --ntasks-per-node 4 pyddl run train.py        # one process per rank\n"
        "  pyddl run -np 4 --emulate-nodes 2 --emulate-link-gbps 1 train.py   # as root\n"
        "  pyddl run -np 8 --emulate-nodes 4 --emulate-racks 2 --emulate-rack-gbps 1 --emulate-link-gbps 1 train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="script.py args... | python -m module args...")
    parser.set_defaults(func=_main)
