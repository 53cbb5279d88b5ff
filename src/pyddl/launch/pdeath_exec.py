"""Worker entry point outside emulation: die with the launcher, then run the job.

The agent starts every worker as `python -I -S pdeath_exec.py --parent PID -- program args...`.
On Linux it asks the kernel for SIGKILL when its parent (the launcher's agent) dies, even by
SIGKILL, and exits if the launcher is already gone; then it replaces itself with the program,
which keeps the request (PR_SET_PDEATHSIG survives exec). Elsewhere no kernel does that: it
stays as the program's parent, a watchdog that kills the program once the launcher is gone
(its own parent changes), passes on the signals the launcher sends and exits as the program
did. A plain script: no `import pyddl`, which would load torch. The emulated path does the
same in netns_exec.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

__all__ = ["main", "watch"]

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5  # how soon the watchdog notices that the launcher is gone
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str]) -> None:
    """`--parent PID -- program args...`: tie the program's life to the launcher's, run it."""
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        sys.exit("usage: pdeath_exec.py --parent PID -- program [args...]")
    parent, program = int(argv[1]), argv[3:]
    linux = sys.platform.startswith("linux")
    if linux:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            err = ctypes.get_errno()
            sys.exit(f"pdeath_exec: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    # The launcher may have died before the request was armed: then nobody would send it.
    if os.getppid() != parent:
        sys.exit(f"pdeath_exec: the launcher (pid {parent}) exited before this worker started")
    if linux:
        os.execvp(program[0], program)
    sys.exit(watch(parent, program))


def watch(parent: int, program: list[str]) -> int:
    """Run `program` as a child until it ends or the launcher `parent` is gone; return its exit
    code. A program ended by a signal ends this process by the same signal."""
    child = subprocess.Popen(program)
    for sig in _FORWARDED:
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    while True:
        try:
            code = child.wait(timeout=_POLL_S)
            break
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:  # orphaned: the launcher died without stopping us
                child.kill()
                code = child.wait()
                break
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    main(sys.argv[1:])
