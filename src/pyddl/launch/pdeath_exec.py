"""Worker entry point outside emulation: die with the launcher, then exec the job.

The agent starts every worker as `python -I -S pdeath_exec.py --parent PID -- program args...`.
On Linux it asks the kernel for SIGKILL when its parent (the launcher's agent) dies, even by
SIGKILL, and exits if the launcher is already gone; then it replaces itself with the program,
which keeps the request (PR_SET_PDEATHSIG survives exec). A plain script: no `import pyddl`,
which would load torch. Elsewhere it only execs. The emulated path does the same in netns_exec.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    """`--parent PID -- program args...`: arm the parent-death signal and exec the program."""
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        sys.exit("usage: pdeath_exec.py --parent PID -- program [args...]")
    parent, program = int(argv[1]), argv[3:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            err = ctypes.get_errno()
            sys.exit(f"pdeath_exec: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
        # The launcher may have died before the request was armed: then nobody would send it.
        if os.getppid() != parent:
            sys.exit(f"pdeath_exec: the launcher (pid {parent}) exited before this worker started")
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
