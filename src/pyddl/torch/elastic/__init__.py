"""Horovod's elastic API on torchrun's elastic agent: `hvd.elastic.run`, TorchState,
ObjectState, ElasticSampler (docs/horovod.md, "Elastic training").

Horovod re-forms its communicator inside the running workers; under `pyddl run --nnodes
MIN:MAX` the agents re-rendezvous and restart the workers instead. So `run` resumes a
(re)started worker from the newest commit any worker of the job holds, and ends a worker
whose collective failed, for its agent to restart it (that takes `--max-restarts`).
"""

from __future__ import annotations

import functools
import os
import sys

import torch.distributed as dist

from pyddl.errors import CollectiveError
from pyddl.torch.elastic.sampler import ElasticSampler
from pyddl.torch.elastic.state import HostsUpdatedInterrupt, ObjectState, State, TorchState

__all__ = ["run", "State", "ObjectState", "TorchState", "ElasticSampler", "HostsUpdatedInterrupt"]


def run(func):
    """Run `func(state, *args, **kwargs)` so that the job survives servers leaving and joining.

    Before `func` runs, every worker takes the newest commit that any worker holds (a restarted
    one reads its server's commit file, a new server has none) and, after a reset, the state's
    reset callbacks run at the new size. A failed collective (HorovodInternalError) ends this
    worker with an error, so that its agent re-forms the job and restarts every worker, which
    then resume from that commit; the launcher needs `--max-restarts K` to allow it.

    Args:
        func: takes the State first; must not start with a collective of its own.

    Example:
        >>> @hvd.elastic.run
        ... def train(state):
        ...     for state.epoch in range(state.epoch, epochs):
        ...         ...
        ...         state.commit()
        >>> train(hvd.elastic.TorchState(model, optimizer, epoch=0))
    """
    @functools.wraps(func)
    def wrapper(state: State, *args, **kwargs):
        from pyddl.torch.ops import init

        init()
        try:
            _resume(state)
            return func(state, *args, **kwargs)
        except (CollectiveError, dist.DistError, HostsUpdatedInterrupt) as err:
            print(_restart_note(state, err), file=sys.stderr, flush=True)
            raise

    return wrapper


def _resume(state: State) -> None:
    """Agree on the newest commit (an allgather of commit counts), take it from the lowest
    rank that holds it, and run the reset callbacks when the job resumes from a commit."""
    from pyddl.torch.functions import allgather_object
    from pyddl.torch.ops import rank

    found = state.load_commit()
    counts = allgather_object(state.commits)
    newest = max(counts)
    root = counts.index(newest)
    if rank() == root:
        state.restore()
    state.sync(root)
    state.save()
    state.commits = newest
    if newest:
        if rank() == root:
            made = f" (made at size {found['size']})" if found else ""
            print(f"pyddl.torch.elastic: {len(counts)} workers resume from commit {newest}{made}, held by rank {root}",
                  file=sys.stderr, flush=True)
        state.on_reset()


def _restart_note(state: State, err: BaseException) -> str:
    what = str(err).splitlines()[0] if str(err) else type(err).__name__
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if left > 0:
        then = f"its launcher restarts the workers, which resume from commit {state.commits}"
    else:
        then = ("no restart is left to resume from the last commit: launch with `pyddl run --nnodes MIN:MAX "
                "--max-restarts K` (or -np N --max-restarts K)")
    return f"pyddl.torch.elastic: this worker stops on {type(err).__name__} ({what}); {then}"
