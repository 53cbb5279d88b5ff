"""Start this server's workers through torchrun's elastic agent and report failures.

The agent gives us the rendezvous, the environment contract (RANK, LOCAL_RANK, ...), rank-
prefixed output, restarts and the stop-everyone-on-failure policy. pyddl adds its own settings
as PYDDL_* variables and turns a failure into one message naming the rank, its exit code or
signal, and the last lines it wrote to stderr. One server alone, one of N (`nnodes`, as torchrun
does it), or every server of `hosts` through pyddl.launch.remote; with `emulate_nodes` the
workers run on an emulated cluster (pyddl.launch.emulate) that lives as long as the job.
Every store the agent hosts listens on one address only (pyddl.launch.rendezvous).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid

from pyddl import env as _env
from pyddl.config import PYDDL_COMMIT_DIR, PYDDL_RESTART_REASON
from pyddl.defaults import WORKER_MALLOC_ENV
from pyddl.launch.config import LaunchError, RunConfig

__all__ = ["RunConfig", "launch", "LaunchError", "worker_command"]

_STDERR_TAIL_LINES = 15
# What the launcher tells workers it restarted (--max-restarts): which worker failed and how.
# Seconds a worker may take to exit once the agent stops it (SIGTERM), then SIGKILL.
_STOP_GRACE_S = 5


def worker_command(command: tuple[str, ...]) -> tuple[str, list[str]]:
    """Map the user's command to (executable, args): a script or `python ...` runs in this
    interpreter, unbuffered, so output appears as it is written; anything else runs as is."""
    first = command[0]
    if first.endswith(".py"):
        return sys.executable, ["-u", *command]
    if os.path.basename(first) in ("python", "python3") or first == sys.executable:
        return sys.executable, ["-u", *command[1:]]
    return first, list(command[1:])


def _rendezvous(cfg: RunConfig, local_addr: str) -> dict:
    """The agent's rendezvous: this machine alone (a free port on `local_addr`), node i of N
    with node 0 hosting the store at --master-addr (static), or c10d for MIN:MAX."""
    from pyddl.launch import rendezvous

    if not cfg.multi_node:
        return dict(min_nodes=1, max_nodes=1, rdzv_backend=rendezvous.STATIC,
                    rdzv_endpoint=rendezvous.format_endpoint(local_addr, 0), rdzv_configs={"rank": 0},
                    local_addr=local_addr)
    endpoint = rendezvous.format_endpoint(cfg.master_addr, cfg.master_port or _env.DEFAULT_MASTER_PORT)
    if cfg.elastic:
        # Whichever server becomes rank 0 hosts the workers' store on its own address, which
        # the others must reach: the interface's, else the one this server uses towards node 0.
        local = _interface_address(cfg.network_interface) or _route_address(cfg.master_addr)
        return dict(min_nodes=cfg.nnodes, max_nodes=cfg.max_nnodes, rdzv_backend=rendezvous.C10D,
                    rdzv_endpoint=endpoint, rdzv_configs=dict(cfg.rdzv_conf), local_addr=local)
    return dict(min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, rdzv_backend=rendezvous.STATIC,
                rdzv_endpoint=endpoint, rdzv_configs={"rank": cfg.node_rank}, local_addr=cfg.master_addr)


def _route_address(master_addr: str) -> str:
    """This server's source address towards `master_addr` (a UDP connect sends nothing)."""
    import socket

    family, _, _, _, sockaddr = socket.getaddrinfo(master_addr, _env.DEFAULT_MASTER_PORT, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(sockaddr)
        except OSError as err:
            raise ValueError(f"--master-addr {master_addr}: no route from this server ({err.strerror}); "
                             f"check the address, or pass --network-interface") from None
        return sock.getsockname()[0]


def _interface_address(ifname: str | None) -> str | None:
    """The first IPv4 address of `ifname` (None: torch's default, the host name)."""
    if not ifname:
        return None
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", ifname.encode()[:15]))
        except OSError as err:
            raise ValueError(f"--network-interface {ifname}: no IPv4 address on this server ({err.strerror}); "
                             f"see `ip -br addr` for its interfaces") from None
    return socket.inet_ntoa(packed[20:24])


def _launch_config(cfg: RunConfig, log_dir: str, local_addr: str = "127.0.0.1"):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    wanted = dict(
        nproc_per_node=cfg.nproc,
        run_id=f"pyddl-{uuid.uuid4().hex[:8]}" if not cfg.multi_node else "pyddl",
        max_restarts=cfg.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        log_line_prefix_template="[rank${rank}] ",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ALL, tee=Std.ALL),
        shutdown_timeout=_STOP_GRACE_S,
        **_rendezvous(cfg, local_addr),
    )
    # Keep to the fields this torch release knows (LaunchConfig grew over 2.4 -> 2.14).
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    return LaunchConfig(**{k: v for k, v in wanted.items() if k in known})


class _AgentEvents(logging.Handler):
    """Act on two moments of torch's agent that it only logs.

    A stop: torch gives a stopped worker 30 s (LocalElasticAgent._stop_workers ignores
    LaunchConfig.shutdown_timeout), and a frozen (SIGSTOPped) worker never acts on SIGTERM,
    so the launcher outlived a `--timeout 10` job by half a minute (issue 23 point 5). The
    agent logs each stop just before it sends the signal: the worker then gets SIGCONT (a
    frozen one acts on the SIGTERM that follows) and, after _STOP_GRACE_S, SIGKILL.

    A failure that --max-restarts allows: the agent restarts every worker without a word.
    This says which worker failed and how, and tells the restarted workers why
    (PYDDL_RESTART_REASON; `pyddl train` records it in its summary).
    """

    _STOP = "Sending process %s closing signal %s"
    _FAILED = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"

    def __init__(self, cfg: RunConfig, log_dir: str):
        super().__init__(logging.WARNING)
        self.cfg, self.log_dir, self.failures = cfg, log_dir, 0
        self.logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")

    def __enter__(self):
        self._saved = (self.logger.level, self.logger.propagate, os.environ.get(PYDDL_RESTART_REASON))
        self.logger.setLevel(logging.WARNING)
        self.logger.propagate = False  # the agent's own lines stay unprinted
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.level, self.logger.propagate, reason = self._saved
        # As found: a program that launches several jobs (bench scaling) passes nothing on.
        if reason is None:
            os.environ.pop(PYDDL_RESTART_REASON, None)
        else:
            os.environ[PYDDL_RESTART_REASON] = reason

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == self._STOP and record.args:
            self._stopping(int(record.args[0]))
        elif record.msg == self._FAILED and record.args:
            self._failed(int(record.args[0]), int(record.args[1]), int(record.args[2]))

    def _stopping(self, pid: int) -> None:
        started = _start_time(pid)
        if started is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGCONT)
        timer = threading.Timer(_STOP_GRACE_S, self._kill, (pid, started))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _kill(pid: int, started: int) -> None:
        if _start_time(pid) == started:  # still that worker, not a new process with its pid
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)

    def _failed(self, exitcode: int, local_rank: int, pid: int) -> None:
        self.failures += 1
        if self.failures > self.cfg.max_restarts:
            return  # no restart left: launch() reports the failure
        if self.cfg.elastic:
            who = f"local rank {local_rank} of host {socket.gethostname()}"
        else:
            who = f"rank {(self.cfg.node_rank or 0) * self.cfg.nproc + local_rank} (local rank {local_rank})"
        reason = f"{who}, pid {pid}, {_how(exitcode)}"
        tail = _stderr_tail(self.log_dir, local_rank)
        print(f"pyddl run: {reason}; restarting every worker (restart {self.failures} of "
              f"{self.cfg.max_restarts})" + (f"\n  last lines of its stderr:\n{tail}" if tail else ""),
              file=sys.stderr, flush=True)
        # The agent starts the new workers with this process's environment.
        os.environ[PYDDL_RESTART_REASON] = reason


def _how(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"was killed by signal {-exitcode}"


def _start_time(pid: int) -> int | None:
    """The start time of `pid` if it is a live child of this process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    state, ppid, started = fields[0], int(fields[1]), int(fields[19])
    return started if ppid == os.getpid() and state != "Z" else None


def _stderr_tail(log_dir: str, local_rank: int) -> str:
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "attempt_*", str(local_rank), "stderr.log"), recursive=True))
    if not paths:
        return ""
    with open(paths[-1], errors="replace") as fh:
        lines = [line.rstrip("\n") for line in fh.readlines()]
    return "\n".join(f"    {line}" for line in lines[-_STDERR_TAIL_LINES:])


def _failure_error(err, log_dir: str, where) -> LaunchError:
    """The launcher's error for failed workers, with the first failed worker's own exit code
    (a program's `sys.exit(2)` for bad input stays 2, as if it had run alone), 1 for a worker
    killed by a signal."""
    failures = sorted(err.failures.items(), key=lambda kv: kv[1].timestamp)
    # Workers the agent stopped after the first failure die of SIGTERM: they are collateral,
    # not causes, unless nothing else failed.
    causes = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or failures[:1]
    code = causes[0][1].exitcode
    return LaunchError(_describe_failures(failures, causes, log_dir, where), code if code > 0 else 1)


def _describe_failures(failures, causes, log_dir: str, where) -> str:
    stopped = [r for r, _ in failures if all(r != c for c, _ in causes)]
    lines = []
    for rank, failure in causes:
        lines.append(f"pyddl run: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}, {where(rank)}) "
                     f"{_how(failure.exitcode)}")
        tail = _stderr_tail(log_dir, failure.local_rank)
        if tail:
            lines.append(f"  last lines of its stderr:\n{tail}")
    others = f" (ranks {', '.join(map(str, stopped))})" if stopped else ""
    lines.append(f"pyddl run: the other workers were stopped{others}.")
    return "\n".join(lines)


def _launch_emulated(cfg: RunConfig, log_dir: str, executable: str, args: list[str]) -> None:
    from torch.distributed.launcher.api import elastic_launch

    from pyddl.launch import netns_exec
    from pyddl.launch.emulate import EmulatedCluster, EmulationError, cpu_sets

    try:
        with EmulatedCluster(cfg.emulate_nodes, cfg.emulate_link_gbps, cfg.emulate_mtu,
                             racks=cfg.emulate_racks or 1, rack_gbps=cfg.emulate_rack_gbps) as cluster:
            # The agent's store is reached at local_addr (MASTER_ADDR): the bridge's address is
            # the one every namespace can route to.
            wrapper = ["-I", netns_exec.__file__, "--netns", cluster.netns_prefix,
                       "--per-server", str(cfg.nproc // cfg.emulate_nodes)]
            if cfg.emulate_pin:
                sets = cpu_sets(cfg.emulate_nodes, sorted(os.sched_getaffinity(0)))
                wrapper += ["--cpus", netns_exec.format_cpu_sets(sets)]
            config = _launch_config(cfg, log_dir, local_addr=cluster.bridge_address)
            elastic_launch(config, sys.executable)(*wrapper, "--", executable, *args)
    except EmulationError as err:
        raise LaunchError(f"pyddl run: {err}", 2) from None


@contextlib.contextmanager
def _whole_lines():
    """While it is open, torch's agent copies worker output to ours one whole line at a time.

    The agent writes whatever `readline()` returns from a worker's log, and a worker that
    writes a line in two pieces (print() does, under PYTHONUNBUFFERED=1) can then have another
    rank's line land in the middle of it: `[rank0] REPORT {...}[rank1] REPORT {...}`. The
    agent looks `tail_logfile` up in its module at each start, so it gets ours while this is
    open, and torch's again afterwards.
    """
    from torch.distributed.elastic.multiprocessing import tail_log

    original, tail_log.tail_logfile = tail_log.tail_logfile, tail_whole_lines
    try:
        yield
    finally:
        tail_log.tail_logfile = original


def tail_whole_lines(header: str, file: str, dst, finished: threading.Event, interval_sec: float,
                     log_line_filter=None) -> None:
    """torch's `tail_logfile`, holding a piece of a line back until the rest of it arrives
    (or the worker ends)."""
    keep = log_line_filter or (lambda _line: True)
    while not os.path.exists(file):
        if finished.is_set():
            return
        time.sleep(interval_sec)
    with open(file, errors="replace") as fp:
        pending = ""
        while True:
            pending += fp.readline()
            if pending.endswith("\n"):
                if keep(pending):
                    dst.write(f"{header}{pending}")
                pending = ""
            elif finished.is_set():
                if pending and keep(pending):
                    dst.write(f"{header}{pending}\n")
                return
            else:  # at the end of the file so far, perhaps inside a line
                time.sleep(interval_sec)


@contextlib.contextmanager
def _worker_environ(cfg: RunConfig, log_dir: str):
    # The agent hands its own environment to the workers. Undo the change afterwards, so
    # that a program launching several jobs (bench scaling) does not pass one job's
    # settings (topology, threads) on to the next.
    wanted = cfg.worker_env()
    # Private (mkdtemp's 0700), outlives the workers' restarts, removed with the launcher's folder.
    wanted.setdefault(PYDDL_COMMIT_DIR, os.path.join(log_dir, "commits"))
    if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in wanted:
        # As torchrun does: N workers each using every core would oversubscribe the machine.
        wanted["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.nproc))
    for key, value in WORKER_MALLOC_ENV.items():  # a user's own setting wins
        if key not in os.environ and key not in wanted:
            wanted[key] = value
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit_with_stdin() -> None:
    # The multi-server driver holds this launcher's stdin; when the driver stops it or dies
    # (a closed ssh connection), stdin ends and the agent stops its workers as on SIGTERM.
    def watch():
        # The raw descriptor, not sys.stdin: a daemon thread blocked in the buffered
        # reader aborts the interpreter's shutdown.
        while os.read(0, 65536):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="pyddl-stdin-watch", daemon=True).start()


def check_command(command: tuple[str, ...]) -> None:
    """Fail before any worker starts when the command cannot start: a missing script, or an
    executable that is not on PATH (the workers would each die with a traceback)."""
    executable, args = worker_command(command)
    if executable == sys.executable:  # args: -u, then a script or an interpreter option
        script = args[1] if len(args) > 1 else ""
        if script.endswith(".py") and not os.path.isfile(script):
            raise ValueError(f"script {script!r} not found (working directory {os.getcwd()}); give the path of an "
                             "existing file")
    elif shutil.which(executable) is None:
        raise ValueError(f"command {executable!r} not found on PATH; give a script (train.py), `python -m module`, "
                         "or an executable")


def launch(cfg: RunConfig) -> None:
    """Run `cfg.command` on this server's `cfg.nproc` workers (or on every server of
    `cfg.hosts`); return when all succeeded.

    Raises:
        ValueError: the command cannot start here (a missing script, not on PATH).
        LaunchError: a worker failed (named, with its stderr tail), the run was interrupted,
            or the emulated cluster or the rendezvous store could not be set up (exit code 2).
    """
    if cfg.hosts:  # the command runs on the servers: their files, their PATH
        from pyddl.launch.remote import launch_hosts

        launch_hosts(cfg)
        return
    check_command(cfg.command)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from pyddl.launch import rendezvous

    rendezvous.register()
    # The agent's own log lines repeat what our message says, less clearly. Each of its
    # modules sets its logger's level itself, so the parent's level is not enough.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    executable, args = worker_command(cfg.command)
    if cfg.exit_with_stdin:
        _exit_with_stdin()
    with tempfile.TemporaryDirectory(prefix="pyddl-run-") as log_dir, _worker_environ(cfg, log_dir), \
            _AgentEvents(cfg, log_dir), _whole_lines():
        try:
            if cfg.emulate_nodes:
                _launch_emulated(cfg, log_dir, executable, args)
            else:
                # Through pdeath_exec, so that no worker outlives a launcher killed by SIGKILL.
                from pyddl.launch import pdeath_exec

                elastic_launch(_launch_config(cfg, log_dir), sys.executable)(
                    "-I", "-S", pdeath_exec.__file__, "--parent", str(os.getpid()), "--", executable, *args)
        except ChildFailedError as err:
            if cfg.emulate_nodes:
                per_server = cfg.nproc // cfg.emulate_nodes
                where = lambda rank: f"emulated server {rank // per_server}"  # noqa: E731
            else:
                where = lambda rank: f"host {socket.gethostname()}"  # noqa: E731
            raise _failure_error(err, log_dir, where) from None
        except rendezvous.RendezvousBindError as err:
            raise LaunchError(f"pyddl run: {err}", 2) from None
        except SignalException as sig:
            code = 128 + int(sig.sigval)
            raise LaunchError(f"pyddl run: interrupted by {signal.Signals(sig.sigval).name}; workers stopped", code) from None
        except KeyboardInterrupt:
            raise LaunchError("pyddl run: interrupted; workers stopped", 130) from None
