"""Run a Python function on N workers and return each rank's result: Horovod's `horovod.run`.

The function travels by reference (its module, or the script that defines it, and its
qualified name), so it must be defined at the top level of a module or script; each worker
imports it there. The function's arguments go to the workers, and their results come back,
pickled through files in a private temporary directory of this machine: nothing is taken
from a peer over the network.
"""

from __future__ import annotations

import importlib
import os
import pickle
import runpy
import socket
import sys
import tempfile

__all__ = ["run"]

_JOB, _RESULT = "job.pkl", "result.{}.pkl"
_LOCAL = {"localhost", "127.0.0.1", "::1", socket.gethostname()}


def _reference(func) -> tuple[str, str, str | None]:
    """(module, qualified name, script path for a script's own function) of `func`."""
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not callable(func) or module is None or "<" in qualname:
        raise ValueError(f"run() sends the function by reference, so it must be defined at the top level of a "
                         f"module or script; {func!r} is not (a lambda, a local function or a bound object)")
    script = None
    if module == "__main__":
        script = getattr(sys.modules["__main__"], "__file__", None)
        if script is None:
            raise ValueError("run() needs the function in a module or a script file, not one typed at the "
                             "interactive prompt: its workers import it from there")
        script = os.path.abspath(script)
    return module, qualname, script


def _slots(hosts: str | None, np: int) -> None:
    """Accept `hosts` only when every host is this machine, with slots for `np` workers."""
    if not hosts:
        return
    total = 0
    for entry in hosts.split(","):
        name, _, count = entry.strip().partition(":")
        if name not in _LOCAL:
            raise NotImplementedError(
                f"run() starts its workers on this machine only, and host {name!r} is another; for several "
                "servers, launch the script with `pyddl run -H host1:4,host2:4 script.py`")
        total += int(count or 1)
    if total < np:
        raise ValueError(f"hosts {hosts!r} has {total} slots for np={np} workers")


def run(func, args=(), kwargs=None, np: int = 1, hosts: str | None = None, **options) -> list:
    """Run `func(*args, **kwargs)` on `np` workers launched as `pyddl run` launches them;
    return the list of their results, in rank order.

    `func` typically calls `hvd.init()` and trains, as in Horovod's self-launching examples.

    Args:
        func: a function defined at the top level of a module or of the running script.
        args, kwargs: its arguments (pickled to the workers).
        np: the number of workers.
        hosts: Horovod's "host:slots,..."; this machine only ("localhost:4").
        options: more `pyddl.launch.RunConfig` fields (topology, allreduce, timeout_s,
            emulate_nodes, ...).

    Raises:
        ValueError: `func` cannot travel by reference, or a bad argument.
        NotImplementedError: `hosts` names another machine.
        pyddl.launch.LaunchError: a worker failed (named, with its stderr tail).

    Example:
        >>> results = pyddl.run(train, args=(config,), np=2)
    """
    from pyddl.launch.local import RunConfig, launch

    reference = _reference(func)
    _slots(hosts, np)
    with tempfile.TemporaryDirectory(prefix="pyddl-run-fn-") as job:
        with open(os.path.join(job, _JOB), "wb") as fh:
            pickle.dump((reference, tuple(args), dict(kwargs or {})), fh)
        launch(RunConfig(nproc=np, command=(sys.executable, "-m", "pyddl.launch.func", job), **options))
        results = []
        for rank in range(np):
            with open(os.path.join(job, _RESULT.format(rank)), "rb") as fh:
                results.append(pickle.load(fh))
        return results


def _resolve(module: str, qualname: str, script: str | None):
    if script is not None:
        # The script's top level runs, but not its `if __name__ == "__main__":` block.
        namespace = runpy.run_path(script, run_name="__pyddl_run__")
        first, *rest = qualname.split(".")
        obj = namespace[first]
    else:
        obj, rest = importlib.import_module(module), qualname.split(".")
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _worker(job: str) -> None:
    with open(os.path.join(job, _JOB), "rb") as fh:
        (module, qualname, script), args, kwargs = pickle.load(fh)
    if script is not None:
        sys.path.insert(0, os.path.dirname(script))  # as if the script were run
    result = _resolve(module, qualname, script)(*args, **kwargs)
    path = os.path.join(job, _RESULT.format(int(os.environ["RANK"])))
    with open(path + ".tmp", "wb") as fh:
        pickle.dump(result, fh)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    _worker(sys.argv[1])
