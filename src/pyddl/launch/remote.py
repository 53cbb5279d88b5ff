"""The multi-server driver behind `pyddl run -H ...`: one launcher per server, one job.

Checks every server is reachable, starts `pyddl run --nnodes M --node-rank i ...` on each
through the --launcher (ssh by default; pyddl.launch.hosts builds the commands), streams their
output, and when one server's launcher fails, stops the others and reports which server, node
and rank failed. `--max-restarts K` restarts every server's launcher, up to K times. A stopped
launcher sees its stdin close (also when an ssh connection drops) and stops its workers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pyddl import env as _env
from pyddl.config import PYDDL_RESTART_REASON
from pyddl.launch.config import LaunchError, RunConfig
from pyddl.launch.hosts import Placement, check_command, forwarded_env, host_address, place_ranks, remote_command

__all__ = ["launch_hosts", "check_reachable", "server_commands", "RESTART_COUNT_ENV"]

RESTART_COUNT_ENV = "PYDDL_RESTART_COUNT"  # how many times the driver has restarted the job
_CHECK_TIMEOUT_S = 15.0
_STOP_GRACE_S = 8.0  # the agent itself gives its workers 5 s (local.py shutdown_timeout)
_TAIL_LINES = 40


def check_reachable(cfg: RunConfig, placements: list[Placement]) -> None:
    """Run `<launcher> true` on every server at once.

    Raises:
        LaunchError: one line per server that did not answer, with the command and its error
            (exit code 2).
    """
    def probe(p: Placement) -> str | None:
        argv = check_command(cfg.launcher, p.host, p.node)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=_CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"no answer within {_CHECK_TIMEOUT_S:g} s to `{' '.join(argv)}`"
        except OSError as err:
            return f"`{' '.join(argv)}` could not start: {err.strerror}"
        if proc.returncode != 0:
            said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            return f"`{' '.join(argv)}` exited with code {proc.returncode}: {said[0]}"
        return None

    with ThreadPoolExecutor(max_workers=min(32, len(placements))) as pool:
        errors = list(pool.map(probe, placements))
    bad = [f"pyddl run: server {p.host} (node {p.node}) is not reachable: {e}"
           for p, e in zip(placements, errors) if e]
    if bad:
        bad.append("pyddl run: check the host names, that the --launcher works non-interactively on each "
                   "(e.g. ssh keys), and that pyddl is installed at the same path there")
        raise LaunchError("\n".join(bad), 2)


def server_commands(cfg: RunConfig, placements: list[Placement], *, restart: int = 0, reason: str | None = None,
                    environ=None, cwd: str | None = None, python: str | None = None) -> list[list[str]]:
    """The command that starts each server's share of the job (see hosts.remote_command);
    a restart tells the workers its number and the failure that caused it."""
    settings = cfg.worker_env()
    if restart:
        settings[RESTART_COUNT_ENV] = str(restart)
        if reason:
            settings[PYDDL_RESTART_REASON] = reason
    env = forwarded_env(os.environ if environ is None else environ, settings)
    run_args = ["--exit-with-stdin"]
    return [
        remote_command(
            cfg.launcher, p, nnodes=len(placements), master_addr=host_address(placements[0].host),
            master_port=cfg.master_port or _env.DEFAULT_MASTER_PORT, cwd=cwd or os.getcwd(),
            python=python or sys.executable, env=env, run_args=run_args, command=cfg.command)
        for p in placements
    ]


@dataclass
class _Server:
    placement: Placement
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    stopped: bool = False

    def describe(self) -> str:
        r = self.placement.ranks
        return f"server {self.placement.host} (node {self.placement.node}, ranks {r.start}-{r.stop - 1})"


def _pump(stream, out, tail: collections.deque | None, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        if tail is not None:
            tail.append(line.rstrip("\n"))
        with lock:
            out.write(line)
            out.flush()
    stream.close()


def _stop(servers: list[_Server]) -> None:
    for s in servers:
        if s.proc.poll() is None:
            s.stopped = True
            try:
                s.proc.stdin.close()
                s.proc.send_signal(signal.SIGTERM)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + _STOP_GRACE_S
    for s in servers:
        try:
            s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


def _failure_message(s: _Server) -> str:
    code = s.proc.returncode
    how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    lines = [f"pyddl run: {s.describe()}: its launcher {how}"]
    # The server's own launcher already named the failed rank; repeat what it said.
    said = list(s.tail)
    starts = [i for i, line in enumerate(said) if line.startswith("pyddl run:")]
    if starts:
        lines += [f"  {line}" for line in said[starts[0]:]]
    elif said:
        lines.append("  last lines of its stderr:")
        lines += [f"    {line}" for line in said[-15:]]
    return "\n".join(lines)


def _run_once(cfg: RunConfig, placements: list[Placement], restart: int, reason: str | None) -> list[_Server]:
    """Run every server's launcher until all succeed or one fails; return the failed ones."""
    lock = threading.Lock()
    servers, pumps = [], []
    try:
        for p, argv in zip(placements, server_commands(cfg, placements, restart=restart, reason=reason)):
            # A session of its own: Ctrl-C reaches the driver, which stops every server in order.
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, bufsize=1, start_new_session=True)
            server = _Server(p, proc)
            servers.append(server)
            for stream, out, tail in ((proc.stdout, sys.stdout, None), (proc.stderr, sys.stderr, server.tail)):
                t = threading.Thread(target=_pump, args=(stream, out, tail, lock), daemon=True)
                t.start()
                pumps.append(t)
        while True:
            failed = [s for s in servers if s.proc.poll() not in (None, 0)]
            if failed or all(s.proc.poll() == 0 for s in servers):
                break
            time.sleep(0.1)
    except BaseException:
        _stop(servers)
        raise
    # Give launchers that failed at the same moment (a link cut times out everywhere) a
    # moment to report on their own before the rest are stopped.
    time.sleep(0.5)
    failed = [s for s in servers if s.proc.poll() not in (None, 0)]
    _stop(servers)
    for t in pumps:
        t.join(timeout=2)
    return failed


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt():
    # SIGTERM/SIGHUP (a scheduler's stop, a closed terminal) must stop the servers as
    # Ctrl-C does, not leave their workers running.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def launch_hosts(cfg: RunConfig) -> None:
    """Run `cfg.command` on the servers of `cfg.hosts`; return when every rank succeeded.

    Raises:
        ValueError: -np does not fit the servers' slots evenly.
        LaunchError: a server is unreachable (exit code 2), a server's launcher failed (the
            message names the server, node and the failed rank), or the run was interrupted.
    """
    placements = place_ranks(cfg.hosts, cfg.nproc)
    check_reachable(cfg, placements)
    reason = None
    with _signals_interrupt():
        for attempt in range(cfg.max_restarts + 1):
            try:
                failed = _run_once(cfg, placements, attempt, reason)
            except _Interrupted as sig:
                name = signal.Signals(sig.signum).name
                raise LaunchError(f"pyddl run: interrupted by {name}; every server's workers stopped",
                                  128 + sig.signum) from None
            except KeyboardInterrupt:
                raise LaunchError("pyddl run: interrupted; every server's workers stopped", 130) from None
            if not failed:
                return
            reason = _report(cfg, placements, failed, attempt)


def _report(cfg: RunConfig, placements: list[Placement], failed: list[_Server], attempt: int) -> str:
    """Announce a restart and return its reason in one line, or raise the failure when no
    restart is left."""
    message = "\n".join(_failure_message(s) for s in failed)
    if attempt < cfg.max_restarts:
        print(f"{message}\npyddl run: restarting every server's workers "
              f"(restart {attempt + 1} of {cfg.max_restarts})", file=sys.stderr, flush=True)
        # The server's launcher named the rank; else say which server's launcher failed.
        named = [line.strip()[len("pyddl run: "):] for line in message.splitlines()[1:]
                 if line.strip().startswith("pyddl run: rank ")]
        return named[0] if named else message.splitlines()[0][len("pyddl run: "):]
    others = [p for p in placements if all(p is not s.placement for s in failed)]
    stopped = ", ".join(f"{p.host} (node {p.node})" for p in others)
    code = failed[0].proc.returncode  # the server's launcher passes its failed worker's code on
    raise LaunchError(message + (f"\npyddl run: stopped the other servers: {stopped}" if stopped else ""),
                      code if code > 0 else 1)
