"""Elastic state: what `state.commit()` keeps and `hvd.elastic.run` brings back after a reset.

Horovod keeps the last commit in memory and re-forms its communicator inside the same
process. Under `pyddl run --nnodes MIN:MAX` (torchrun's agent) a lost or added server
restarts the worker processes instead, so a commit is also written, atomically, to this
server's PYDDL_COMMIT_DIR (one file, by local rank 0), which outlives the restart. Without
that variable (plain torchrun unless set) commits stay in memory and a restart starts over.
"""

from __future__ import annotations

import copy
import os
import stat

import torch

from pyddl.config import PYDDL_COMMIT_DIR
from pyddl.torch.elastic.sampler import ElasticSampler

__all__ = ["State", "ObjectState", "TorchState", "HostsUpdatedInterrupt"]

_COMMIT_FILE = "state.pt"


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's signal that servers were added or removed (`skip_sync`: none was removed).

    pyddl never raises it: torchrun's agent restarts the workers when a server joins, and
    they resume from the last commit. `hvd.elastic.run` treats one the user raises as a reset.
    """

    def __init__(self, skip_sync: bool = False):
        super().__init__("the job's servers changed")
        self.skip_sync = skip_sync


class State:
    """What a training process commits, restores and synchronizes across workers.

    Args:
        bcast_object: `f(obj, root_rank)` returning root_rank's obj on every rank (default:
            hvd.broadcast_object); Horovod's ObjectState takes it first.
        get_rank: this worker's rank (default: hvd.rank).
    """

    def __init__(self, bcast_object=None, get_rank=None):
        from pyddl.torch.functions import broadcast_object
        from pyddl.torch.ops import rank

        self._bcast_object = bcast_object or broadcast_object
        self._rank = get_rank or rank
        self._reset_callbacks = []
        self.commits = 0  # how many commits the job has made: 0 is the state it started with

    def register_reset_callbacks(self, callbacks) -> None:
        """Call each of `callbacks` (no arguments) after every reset: when the workers resume
        from a commit, at the size the job has now (re-scale the learning rate there)."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Keep the state as it is now, in memory and in this server's commit file.

        A reset resumes from the newest commit, so the work since then is redone: commit
        as often as that trade (redone steps against the copy's cost) makes sense.
        """
        self.save()
        self.commits += 1
        path = commit_path()
        if path is not None:
            _write_atomically(path, dict(commits=self.commits, size=int(os.environ.get("WORLD_SIZE", "1")),
                                         saved=self._saved()))
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Horovod raises HostsUpdatedInterrupt here when servers changed. Under torchrun the
        agent restarts the workers itself when a server joins: nothing to check in-process."""

    def load_commit(self) -> dict | None:
        """Make this server's newest commit file, if newer than what memory holds, the state
        that restore() brings back; return what the file says about it (commits, size)."""
        path = commit_path()
        found = _read_checked(path) if path is not None else None
        if found is None or found["commits"] <= self.commits:
            return None
        self._set_saved(found["saved"])
        self.commits = found["commits"]
        return dict(commits=found["commits"], size=found["size"])

    def save(self) -> None:
        """Copy the state into memory (commit() also writes it out)."""
        raise NotImplementedError

    def restore(self) -> None:
        """Bring back the last saved state, undoing what changed since."""
        raise NotImplementedError

    def sync(self, root_rank: int = 0) -> None:
        """Give every worker rank `root_rank`'s state (Horovod: always rank 0's)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Adjust to a new job size after a reset, before the callbacks run."""

    def _saved(self):
        raise NotImplementedError

    def _set_saved(self, saved) -> None:
        raise NotImplementedError


class ObjectState(State):
    """State made of plain Python objects, given as keyword arguments and kept as attributes.

    Example:
        >>> state = hvd.elastic.ObjectState(epoch=0, batch=0)
        >>> state.epoch += 1; state.commit()
    """

    def __init__(self, bcast_object=None, get_rank=None, **kwargs):
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object=bcast_object, get_rank=get_rank)

    def save(self) -> None:
        self._saved_state = {name: copy.deepcopy(getattr(self, name)) for name in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self, root_rank: int = 0) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state, root_rank)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, copy.deepcopy(value))

    def _saved(self):
        return self._saved_state

    def _set_saved(self, saved) -> None:
        self._saved_state = saved


class TorchState(ObjectState):
    """The state of a PyTorch training process: models, optimizers, ElasticSamplers (each
    through its state_dict) and any other attributes (as plain objects).

    Example:
        >>> state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0, batch=0)
    """

    def __init__(self, model=None, optimizer=None, **kwargs):
        kwargs.update(model=model, optimizer=optimizer)
        handlers = {name: _handler(value) for name, value in kwargs.items()}
        self._handlers = {name: h for name, h in handlers.items() if h is not None}
        for name, handler in self._handlers.items():
            object.__setattr__(self, name, handler.value)
        super().__init__(**{name: value for name, value in kwargs.items() if name not in self._handlers})

    def __setattr__(self, name, value):
        # `state.model = other` tracks the new object from here on, as Horovod's does.
        if name in getattr(self, "_handlers", {}):
            self._handlers[name].set_value(value)
        super().__setattr__(name, value)

    def save(self) -> None:
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self, root_rank: int = 0) -> None:
        for handler in self._handlers.values():
            handler.sync(root_rank)
        super().sync(root_rank)

    def _saved(self):
        return dict(handlers={name: h.saved for name, h in self._handlers.items()}, objects=self._saved_state)

    def _set_saved(self, saved) -> None:
        for name, value in saved["handlers"].items():
            self._handlers[name].saved = value
        self._saved_state = saved["objects"]


class _Handler:
    """One stateful torch object of a TorchState, committed through its state_dict."""

    def __init__(self, value):
        self.value = value
        self.save()

    def set_value(self, value) -> None:
        self.value = value
        self.save()

    def save(self) -> None:
        self.saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self.saved)


class _ModelHandler(_Handler):
    def sync(self, root_rank: int) -> None:
        from pyddl.torch.functions import broadcast_parameters

        broadcast_parameters(self.value.state_dict(), root_rank=root_rank)


class _OptimizerHandler(_Handler):
    def sync(self, root_rank: int) -> None:
        from pyddl.torch.functions import broadcast_optimizer_state

        broadcast_optimizer_state(self.value, root_rank=root_rank)


class _SamplerHandler(_Handler):
    def sync(self, root_rank: int) -> None:
        from pyddl.torch.functions import broadcast_object

        # Loading re-shards the rest of the epoch over the job's current size.
        self.value.load_state_dict(broadcast_object(self.value.state_dict(), root_rank))


def _handler(value) -> _Handler | None:
    for kind, handler in ((torch.nn.Module, _ModelHandler), (torch.optim.Optimizer, _OptimizerHandler),
                          (ElasticSampler, _SamplerHandler)):
        if isinstance(value, kind):
            return handler(value)
    return None


def commit_path() -> str | None:
    """This server's commit file, written and read by its local rank 0 only (the others hold
    the same state); None without PYDDL_COMMIT_DIR or on another local rank."""
    folder = os.environ.get(PYDDL_COMMIT_DIR)
    if not folder or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    return os.path.join(folder, _COMMIT_FILE)


def _write_atomically(path: str, content: dict) -> None:
    # A worker killed mid-write leaves the previous commit whole: write aside, then rename.
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    torch.save(content, partial)
    os.replace(partial, path)


def _read_checked(path: str) -> dict | None:
    """The commit at `path`, if any. It is a pickle (a commit holds any object the user put in
    the state), so it is read only from a folder of this user's that nobody else may write."""
    folder = os.path.dirname(path)
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{PYDDL_COMMIT_DIR}={folder} is not a private folder of this user (owner uid "
                              f"{info.st_uid}, mode {stat.filemode(info.st_mode)}); a commit is a pickle and is "
                              "read only from one: `chmod go-w` it, or give a folder of your own")
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        return None
