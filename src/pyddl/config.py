"""How collectives run: one frozen, torch-free `Settings`, and every `PYDDL_*` variable.

The launcher builds each worker's environment with `Settings.to_env()`, a worker reads it back
with `Settings.from_env()`, and `pyddl.init(...)` keywords override it: the names, defaults and
checks below are the only place each setting is written. Pure: importable without torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Mapping

from pyddl import defaults
from pyddl.comm.registry import ALGORITHM_CHOICES, CODECS
from pyddl.topology.spec import parse_topology

__all__ = [
    "Settings",
    "ALGORITHM_CHOICES",
    "CODECS",
    "DEFAULT_TIMEOUT_S",
    "PYDDL_TOPOLOGY",
    "PYDDL_ALLREDUCE",
    "PYDDL_TIMEOUT",
    "PYDDL_CHUNK_BYTES",
    "PYDDL_CHECK",
    "PYDDL_COMPRESSION",
    "PYDDL_STALL_WARN",
    "PYDDL_RESTART_COUNT",
    "PYDDL_RESTART_REASON",
    "PYDDL_COMMIT_DIR",
    "PYDDL_TIMELINE",
    "PYDDL_LINK_GBPS",
    "PYDDL_RACKS",
    "PYDDL_RACK_GBPS",
]

# Settings (each also a keyword of pyddl.init and a flag of `pyddl run`, `train`, `bench`).
PYDDL_TOPOLOGY = "PYDDL_TOPOLOGY"  # dims innermost first, e.g. "4x2"
PYDDL_ALLREDUCE = "PYDDL_ALLREDUCE"  # an allreduce algorithm: native | multiring | auto
PYDDL_TIMEOUT = "PYDDL_TIMEOUT"  # seconds any collective may wait
PYDDL_CHUNK_BYTES = "PYDDL_CHUNK_BYTES"  # pipelining chunk of the multiring allreduce
PYDDL_CHECK = "PYDDL_CHECK"  # "1" (default): cross-rank fingerprint check of every collective
PYDDL_COMPRESSION = "PYDDL_COMPRESSION"  # the wire codec of calls that name none: none | fp16 | bf16
PYDDL_STALL_WARN = "PYDDL_STALL_WARN"  # seconds before a waiting collective warns about slow ranks
# Facts the launcher tells its workers (not settings of the collectives).
# How many times the job was restarted: set by `pyddl run -H` (which restarts every server),
# added to torchrun's TORCHELASTIC_RESTART_COUNT (restarts by one agent) in JobEnv.restart_count.
PYDDL_RESTART_COUNT = "PYDDL_RESTART_COUNT"
# What failed before the last restart, in one line (`pyddl train` records it in its summary).
PYDDL_RESTART_REASON = "PYDDL_RESTART_REASON"
# A private folder of this server that outlives its workers' restarts: pyddl.torch.elastic's
# state.commit() keeps the newest commit there (`pyddl run` sets it inside its own temporary
# folder, removed when the launcher exits).
PYDDL_COMMIT_DIR = "PYDDL_COMMIT_DIR"
PYDDL_TIMELINE = "PYDDL_TIMELINE"  # a Chrome-trace file to record (pyddl.timeline)
PYDDL_LINK_GBPS = "PYDDL_LINK_GBPS"  # the emulated servers' link rate, for the bench's bound
PYDDL_RACKS = "PYDDL_RACKS"  # how many emulated racks the servers fill, consecutively (same bound)
PYDDL_RACK_GBPS = "PYDDL_RACK_GBPS"  # the emulated racks' uplink rate (same bound)

DEFAULT_TIMEOUT_S = 300.0
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class Settings:
    """How the collectives of a job (or of one communicator) run.

    Every field is checked when the object is made, so a bad value fails where it was given
    (a flag of `pyddl run`, an argument of `pyddl.init`, an environment variable) instead of
    in every worker.

    Example:
        >>> Settings.from_env({"PYDDL_ALLREDUCE": "multiring"}, timeout_s=60).to_env()["PYDDL_TIMEOUT"]
        '60.0'
    """

    topology: str | None = None  # None: ranks grouped by server
    allreduce: str = "native"
    timeout_s: float = DEFAULT_TIMEOUT_S
    chunk_bytes: int = defaults.CHUNK_BYTES
    check: bool = True
    compression: str = "none"
    stall_warn_s: float | None = None  # None: min(60 s, timeout / 2)

    def __post_init__(self):
        alg = str(self.allreduce).lower()
        if alg not in ALGORITHM_CHOICES:
            raise ValueError(f"unknown allreduce algorithm {self.allreduce!r}; choose one of "
                             f"{', '.join(ALGORITHM_CHOICES)} (--allreduce, {PYDDL_ALLREDUCE}, pyddl.init(allreduce=))")
        object.__setattr__(self, "allreduce", alg)
        codec = str(self.compression).lower()
        if codec not in CODECS:
            raise ValueError(f"unknown compression {self.compression!r}; choose one of {', '.join(CODECS)} "
                             f"({PYDDL_COMPRESSION})")
        object.__setattr__(self, "compression", codec)
        object.__setattr__(self, "timeout_s", _positive("timeout", self.timeout_s, f"--timeout, {PYDDL_TIMEOUT}"))
        if self.stall_warn_s is not None:
            object.__setattr__(self, "stall_warn_s", _positive("stall warning", self.stall_warn_s, PYDDL_STALL_WARN))
        chunk = self.chunk_bytes
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"chunk_bytes must be a positive whole number of bytes, got {chunk!r} "
                             f"(--chunk-bytes, {PYDDL_CHUNK_BYTES})")
        if self.topology is not None:
            if not str(self.topology).strip():
                raise ValueError(f"the topology is empty; give dims such as 2x2 or leave it out "
                                 f"(--topology, {PYDDL_TOPOLOGY})")
            parse_topology(self.topology)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Read the settings from `env` (default: os.environ); keyword arguments that are not
        None win over it.

        Raises:
            ValueError: a variable or keyword is malformed (the message names it).
        """
        env = os.environ if env is None else env
        values: dict = {}
        readers = {
            "topology": (PYDDL_TOPOLOGY, str),
            "allreduce": (PYDDL_ALLREDUCE, str),
            "timeout_s": (PYDDL_TIMEOUT, float),
            "chunk_bytes": (PYDDL_CHUNK_BYTES, int),
            "check": (PYDDL_CHECK, lambda text: text.strip().lower() not in _FALSE),
            "compression": (PYDDL_COMPRESSION, str),
            "stall_warn_s": (PYDDL_STALL_WARN, float),
        }
        for name, (key, parse) in readers.items():
            if key in env and env[key] != "":
                try:
                    values[name] = parse(env[key])
                except ValueError:
                    raise ValueError(f"environment variable {key}={env[key]!r} is not a valid "
                                     f"{parse.__name__ if parse in (int, float) else 'value'}") from None
        unknown = set(overrides) - set(readers)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(readers)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env()` return these settings."""
        out = {
            PYDDL_ALLREDUCE: self.allreduce,
            PYDDL_TIMEOUT: repr(float(self.timeout_s)),
            PYDDL_CHUNK_BYTES: str(self.chunk_bytes),
            PYDDL_CHECK: "1" if self.check else "0",
            PYDDL_COMPRESSION: self.compression,
        }
        if self.topology is not None:
            out[PYDDL_TOPOLOGY] = self.topology
        if self.stall_warn_s is not None:
            out[PYDDL_STALL_WARN] = repr(float(self.stall_warn_s))
        return out

    def replace(self, **changes) -> "Settings":
        """A copy with `changes` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    @property
    def stall_warn(self) -> float:
        """Seconds a waiting collective waits before it names the ranks behind (a warning;
        Horovod's stall check warns after 60 s)."""
        return self.stall_warn_s if self.stall_warn_s is not None else min(60.0, self.timeout_s / 2)


def _positive(what: str, value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r} ({where})") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r} ({where})")
    return number
