"""Worker entry point under emulation: enter this rank's server namespace, pin, exec the job.

The agent starts every worker as `python -I netns_exec.py --netns PREFIX --per-server K
[--cpus SETS] -- program args...`; rank LOCAL_RANK belongs to server LOCAL_RANK // K. It runs
as a plain script (no `import pyddl`, which would load torch) and replaces itself with the
program, so the agent's signals reach the worker directly. Linux only; needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

__all__ = ["main", "parse_cpu_sets", "format_cpu_sets"]

_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_SLAVE = 0x1000, 0x4000, 0x80000
_PR_SET_PDEATHSIG = 1
_NETNS_DIR = "/run/netns"
_NETNS_ETC = "/etc/netns"  # pyddl.launch.emulate.NETNS_ETC (not imported: that loads no torch, but this stays plain)


def format_cpu_sets(sets: list[list[int]]) -> str:
    """Encode per-server CPU sets for the command line: "0,1;2,3" (server 0: cores 0-1)."""
    return ";".join(",".join(map(str, s)) for s in sets)


def parse_cpu_sets(text: str) -> list[list[int]]:
    """Decode what `format_cpu_sets` wrote."""
    return [[int(c) for c in part.split(",")] for part in text.split(";")]


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
    # A worker must not outlive a launcher killed with SIGKILL (it could not tear the
    # namespace down); the next start also kills such orphans, this just does it at once.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _use_netns_hosts(libc, name)


def _use_netns_hosts(libc, name: str) -> None:
    # As `ip netns exec` does: the namespace's own hosts file over /etc/hosts, in a mount
    # namespace of this process (changes do not propagate back), so that its addresses resolve.
    hosts = os.path.join(_NETNS_ETC, name, "hosts")
    if not os.path.exists(hosts):
        return
    if (libc.unshare(_CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None) != 0
            or libc.mount(hosts.encode(), b"/etc/hosts", None, _MS_BIND, None) != 0):
        err = ctypes.get_errno()
        raise OSError(err, f"cannot use {hosts} in network namespace {name}: {os.strerror(err)}")


def main(argv: list[str] | None = None) -> None:
    """Enter the namespace of this rank's server, pin it if asked, and exec the program."""
    parser = argparse.ArgumentParser(prog="netns_exec", allow_abbrev=False)
    parser.add_argument("--netns", required=True, help="namespace name without the server index")
    parser.add_argument("--per-server", type=int, required=True, help="consecutive ranks per server")
    parser.add_argument("--cpus", help="per-server CPU sets, e.g. '0;1'")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program to run after --")
    server = int(os.environ["LOCAL_RANK"]) // args.per_server
    _enter_netns(f"{args.netns}{server}")
    if args.cpus:
        os.sched_setaffinity(0, parse_cpu_sets(args.cpus)[server])
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
