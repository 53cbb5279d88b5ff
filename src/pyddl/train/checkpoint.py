"""Checkpoints that are safe to load, atomic to write, and checked before they are trusted.

A checkpoint holds only tensors and primitive types, so `torch.load(weights_only=True)` reads it
and a file from elsewhere cannot run code. Each ckpt-NNNNNN.pt is written to a temp file in the
same folder, fsynced and renamed over; a ckpt-NNNNNN.pt.sha256 sidecar (written after the data)
lets `load_latest` detect truncation or corruption and fall back to the previous good file.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pyddl.errors import PyddlError

__all__ = [
    "CheckpointManager",
    "NonFiniteError",
    "apply_state",
    "atomic_save",
    "capture_rng_state",
    "ensure_finite",
    "file_sha256",
    "make_state",
    "nonfinite_entries",
    "restore_rng_state",
]

_NAME = re.compile(r"^ckpt-(\d{6,})\.pt$")
_CHUNK = 1 << 20


class NonFiniteError(PyddlError):
    """Parameters or optimizer state hold NaN or Inf; saving them would poison the checkpoint."""


def capture_rng_state() -> dict[str, Any]:
    """Return the python, numpy and torch (CPU and every CUDA device) RNG states as tensors and ints."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by `capture_rng_state` (CUDA only if both sides have it)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def nonfinite_entries(tensors: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Return the dotted names of floating tensors (nested in dicts/lists) holding NaN or Inf."""
    bad = []
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, Mapping):
            bad += nonfinite_entries(value, name + ".")
        elif isinstance(value, (list, tuple)):
            bad += nonfinite_entries(dict(enumerate(value)), name + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(name)
    return bad


def ensure_finite(state: Mapping[str, Any]) -> None:
    """Raise NonFiniteError naming the first entries of `state` that hold NaN or Inf.

    Args:
        state: a checkpoint dict, or any (nested) mapping of tensors such as a state_dict.

    Raises:
        NonFiniteError: at least one floating tensor or float is not finite.
    """
    bad = nonfinite_entries(state)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"refusing to save a checkpoint with non-finite values in {', '.join(bad[:5])}{more}; "
            "the previous checkpoints are kept: lower the learning rate or resume from one"
        )


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is (POSIX; a no-op elsewhere).
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM back until the block is done, then deliver them.

    A handler that raises (KeyboardInterrupt, or the trainer's quiet SystemExit) in the middle of
    torch.save leaves the zip writer half-closed, and its cleanup then raises a second exception
    with a traceback. The write itself is atomic either way; holding the signal makes the exit
    clean and keeps data and sidecar in step. Only the main thread can change handlers; other
    threads never receive Python signal handlers anyway. A signal whose handler was not set
    from Python (getsignal gives None) is left alone: Python could not put it back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum))
                for sig in _HELD_SIGNALS if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def atomic_save(obj: Any, path: str | os.PathLike) -> str:
    """Write `obj` with torch.save atomically (temp file, fsync, rename) plus a .sha256 sidecar.

    A reader sees the old file or the new one, never half of one. Between the data rename and
    the sidecar rename a crash leaves data and sidecar disagreeing, which `CheckpointManager`
    reports as a bad file. Ctrl-C and SIGTERM that arrive during the write (main thread) are
    delivered once both files are in place.

    Args:
        obj: tensors and primitive types only, so `torch.load(weights_only=True)` reads it.
        path: destination; its folder must exist.

    Returns:
        The SHA-256 hex digest of the written file.
    """
    path = Path(path)
    with _signals_held():
        _atomic_write(path, lambda f: torch.save(obj, f))
        digest = file_sha256(path)
        size = path.stat().st_size
        _atomic_write(Path(f"{path}.sha256"), lambda f: f.write(f"{digest}  {size}\n".encode()))
    return digest


def make_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
               step: int, global_step: int, sampler: Any = None, scheduler: Any = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Collect what a bit-identical resume needs into one dict of tensors and primitives.

    Args:
        model: the bare model (not a wrapper that prefixes its keys).
        optimizer: its optimizer (momentum buffers included).
        epoch, step: where training continues: `step` batches of `epoch` are done.
        global_step: optimizer steps done in the whole run (the recipe's clock).
        sampler: anything with state_dict() (a ShardSampler), or None.
        scheduler: a torch lr_scheduler, or None when the recipe sets the lr per step.
        extra: more primitives to keep (e.g. the config as a dict).

    Returns:
        The checkpoint dict for `CheckpointManager.save`.
    """
    state = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": {"epoch": int(epoch), "step": int(step), "global_step": int(global_step)},
        "rng": capture_rng_state(),
    }
    if sampler is not None:
        state["sampler"] = sampler.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if extra is not None:
        state["extra"] = dict(extra)
    return state


def apply_state(state: Mapping[str, Any], model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None = None, *, sampler: Any = None,
                scheduler: Any = None, restore_rng: bool = True) -> dict[str, int]:
    """Load a `make_state` dict back into the training objects.

    Returns:
        The position: {"epoch", "step", "global_step"}.

    Raises:
        ValueError: the checkpoint lacks a part that was asked for.
    """
    wanted = {"sampler": sampler, "scheduler": scheduler}
    missing = [k for k, v in wanted.items() if v is not None and k not in state]
    if missing:
        raise ValueError(f"checkpoint has no {', '.join(missing)} state; it was saved without it")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    for key, obj in wanted.items():
        if obj is not None:
            obj.load_state_dict(state[key])
    if restore_rng:
        restore_rng_state(state["rng"])
    return {k: int(v) for k, v in state["position"].items()}


class CheckpointManager:
    """Numbered checkpoints ckpt-NNNNNN.pt in one folder, the newest `keep` of them kept.

    Example:
        >>> mgr = CheckpointManager("runs/x/checkpoints", keep=3)
        >>> mgr.save({"model": model.state_dict(), "epoch": 3}, index=3)
        >>> index, state = mgr.load_latest()      # (None, None) when there is none
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        self.directory, self.keep = Path(directory), keep

    def path(self, index: int) -> Path:
        """Return the path of checkpoint `index`."""
        return self.directory / f"ckpt-{index:06d}.pt"

    def indices(self) -> list[int]:
        """Return the indices of the checkpoint files present, oldest first (verified or not)."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def remove_stale_temps(self) -> list[Path]:
        """Delete the `.ckpt-*.tmp` files a writer killed mid-save left behind; return them.

        Call it only where no other process is saving into this folder (the one writer,
        before it writes).
        """
        if not self.directory.is_dir():
            return []
        stale = sorted(self.directory.glob(".ckpt-*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def save(self, state: Mapping[str, Any], index: int) -> Path:
        """Check `state` is finite, write it as checkpoint `index`, then prune to the newest
        `keep`; temporaries of an earlier, interrupted save are removed first.

        Raises:
            NonFiniteError: `state` holds NaN or Inf; nothing is written or removed.
        """
        if index < 0:
            raise ValueError(f"checkpoint index must be >= 0, got {index}")
        ensure_finite(state)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temps()
        path = self.path(index)
        atomic_save(dict(state), path)
        for old in self.indices()[:-self.keep]:
            if old != index:
                for stale in (self.path(old), Path(f"{self.path(old)}.sha256")):
                    stale.unlink(missing_ok=True)
        return path

    def verify(self, index: int) -> None:
        """Check checkpoint `index` against its sidecar.

        Raises:
            ValueError: the sidecar is missing or malformed, or size or digest differ.
        """
        path = self.path(index)
        sidecar = Path(f"{path}.sha256")
        try:
            digest, size = sidecar.read_text().split()
            size = int(size)
        except FileNotFoundError:
            raise ValueError(f"{path}: no {sidecar.name} (the write did not finish)") from None
        except ValueError:
            raise ValueError(f"{sidecar}: malformed, expected '<sha256>  <bytes>'") from None
        try:
            actual_size = path.stat().st_size
            actual_digest = file_sha256(path) if actual_size == size else None
        except OSError as exc:
            raise ValueError(f"{path}: unreadable: {exc}") from exc
        if actual_size != size:
            raise ValueError(f"{path}: {actual_size} bytes, the sidecar says {size} (truncated?)")
        if actual_digest != digest:
            raise ValueError(f"{path}: SHA-256 differs from {sidecar.name} (corrupted)")

    def load(self, index: int, map_location: Any = "cpu") -> dict:
        """Verify and load checkpoint `index` with torch.load(weights_only=True).

        Raises:
            ValueError: verification failed, or the file is not a safe torch checkpoint.
        """
        self.verify(index)
        try:
            return torch.load(self.path(index), map_location=map_location, weights_only=True)
        except Exception as exc:  # the unpickler raises several types for foreign content
            raise ValueError(f"{self.path(index)}: not loadable with weights_only=True: {exc}") from exc

    def load_latest(self, map_location: Any = "cpu") -> tuple[int | None, dict | None]:
        """Load the newest checkpoint that verifies, warning about each newer bad one.

        Returns:
            (index, state), or (None, None) when the folder has no good checkpoint.
        """
        for index in reversed(self.indices()):
            try:
                return index, self.load(index, map_location)
            except ValueError as exc:
                warnings.warn(f"skipping bad checkpoint {self.path(index)}: {exc}",
                              RuntimeWarning, stacklevel=2)
        return None, None
