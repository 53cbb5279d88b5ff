"""Cluster descriptions for `pyddl simulate`: servers, links per topology level, the device.

A description is a TOML file, shipped ones under pyddl/sim/clusters/ (select by name) or any
path. `Cluster.fabric(gpus)` turns it into the cost model's `Fabric` for a job of that many
GPUs laid out server by server. Reading TOML needs Python 3.11 (tomllib) or `tomli` on 3.10.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from pyddl.sim.cost import Fabric, Level

__all__ = ["LevelSpec", "DeviceSpec", "CommCpuSpec", "Cluster", "load_cluster", "shipped_clusters", "cluster_to_toml"]

_SHIPPED_DIR = "clusters"


@dataclass(frozen=True)
class LevelSpec:
    """One level of the network as the file states it (innermost first).

    `size` is how many units of the next-inner level one unit of this level holds, needed for
    levels between the server and the outermost one (e.g. 16 servers per leaf switch).
    """

    name: str
    link_gbps: float
    latency_us: float
    links: int = 1
    size: int | None = None


@dataclass(frozen=True)
class DeviceSpec:
    """The accelerator: a published training throughput that sets its effective rate."""

    name: str
    reference_model: str
    reference_batch: int
    reference_images_per_s: float
    memory_gb_per_s: float
    reference_image_size: int = 224
    step_overhead_us: float = 0.0


@dataclass(frozen=True)
class CommCpuSpec:
    """The CPU time one rank spends on one allreduce of one algorithm: per call plus per byte.

    Stated (or fitted by `--calibrate` from Gloo benches) only where communication shares the
    cores with compute, as on a CPU cluster with every core training: that time then comes
    out of the compute."""

    per_call_us: float
    per_byte_ns: float

    def seconds(self, nbytes: float) -> float:
        return self.per_call_us * 1e-6 + self.per_byte_ns * 1e-9 * nbytes


@dataclass(frozen=True)
class Cluster:
    """A cluster: `servers` x `gpus_per_server` GPUs, `levels` innermost first."""

    name: str
    gpus_per_server: int
    servers: int
    levels: tuple[LevelSpec, ...]
    device: DeviceSpec | None = None
    reduce_gb_per_s: float | None = None
    multiring_pipeline: bool = True
    # Host time of one multiring stage on one chunk (thread hand-off, issuing its p2p calls).
    multiring_stage_us: float = 0.0
    # Per algorithm ("native", "multiring"), where communication shares the compute cores.
    comm_cpu: dict[str, CommCpuSpec] = field(default_factory=dict)
    description: str = ""

    @property
    def max_gpus(self) -> int:
        return self.gpus_per_server * self.servers

    @property
    def gamma_s_per_byte(self) -> float:
        """Cost of reducing one byte: stated, or 3 bytes of memory traffic per byte reduced."""
        if self.reduce_gb_per_s:
            return 1.0 / (self.reduce_gb_per_s * 1e9)
        if self.device is not None:
            return 3.0 / (self.device.memory_gb_per_s * 1e9)
        return 0.0

    def dims_for(self, gpus: int) -> tuple[int, ...]:
        """Return the topology dims (one per level) of a job of `gpus` GPUs, server by server.

        Raises:
            ValueError: `gpus` is not 1 or a multiple of gpus_per_server, exceeds the
                cluster, or does not fill the intermediate levels evenly.
        """
        if not isinstance(gpus, int) or gpus < 1:
            raise ValueError(f"GPU count must be a positive integer, got {gpus!r}")
        g = self.gpus_per_server
        if gpus > self.max_gpus:
            raise ValueError(
                f"{gpus} GPUs is more than cluster {self.name!r} has ({self.servers} servers x {g} "
                f"GPUs = {self.max_gpus}); pass --gpus up to {self.max_gpus}"
            )
        if gpus == 1:
            return (1,) * len(self.levels)
        if gpus % g:
            raise ValueError(
                f"{gpus} GPUs is not a multiple of the {g} GPUs per server of cluster "
                f"{self.name!r}; pyddl fills servers one by one, so pass multiples of {g} "
                f"(e.g. {g}, {2 * g}, {4 * g})"
            )
        dims, remaining = [g], gpus // g
        for spec in self.levels[1:-1]:
            size = int(spec.size)
            if remaining <= size:
                dims.append(remaining)
                remaining = 1
            elif remaining % size:
                raise ValueError(
                    f"{gpus // g} servers do not fill whole {spec.name!r} groups of {size} servers "
                    f"in cluster {self.name!r}; pass a GPU count that is a multiple of {g * size}"
                )
            else:
                dims.append(size)
                remaining //= size
        if len(self.levels) > 1:
            dims.append(remaining)
        return tuple(dims)

    def fabric(self, gpus: int, ring_max: int | None = None) -> Fabric:
        """Return the cost model's view of a job of `gpus` GPUs on this cluster.

        Args:
            ring_max: split every dim between servers that is longer than this into rings of
                at most `ring_max` over the same links, as DDL ran 64 servers as 16x4
                (ANCHORS.md); None keeps one ring per level (pyddl's default topology).
        """
        overhead = self.device.step_overhead_us if self.device is not None else 0.0
        levels, dims = [], []
        for j, (spec, d) in enumerate(zip(self.levels, self.dims_for(gpus))):
            level = Level(spec.name, (spec.latency_us + overhead) * 1e-6, spec.link_gbps * 1e9 / 8, spec.links)
            parts = _split_ring(d, ring_max) if j > 0 and ring_max else [d]
            levels += [level] * len(parts)
            dims += parts
        return Fabric(tuple(levels), tuple(dims), self.gamma_s_per_byte, self.multiring_stage_us * 1e-6)


def _split_ring(d: int, ring_max: int) -> list[int]:
    """Factor a ring of `d` into rings of at most `ring_max`, largest first (64, 16 -> 16x4).

    A factor that cannot be split further (a prime above ring_max) stays whole.
    """
    if ring_max < 2:
        raise ValueError(f"ring_max must be >= 2, got {ring_max}")
    parts = []
    while d > ring_max:
        factor = next((f for f in range(ring_max, 1, -1) if d % f == 0), None)
        if factor is None:
            break
        parts.append(factor)
        d //= factor
    return parts + [d]


def shipped_clusters() -> list[str]:
    """Names of the cluster descriptions shipped with pyddl."""
    folder = resources.files("pyddl.sim").joinpath(_SHIPPED_DIR)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_cluster(spec: str) -> Cluster:
    """Load a shipped cluster by name, or a TOML description from a path.

    Raises:
        ValueError: unknown name, unreadable file, or a description with missing/bad fields.
        RuntimeError: no TOML reader (Python 3.10 without `tomli`).

    Example:
        >>> load_cluster("powerai-ddl-2017").max_gpus
        256
    """
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ValueError(f"cluster file {spec!r} does not exist; pass a shipped name "
                             f"({', '.join(shipped_clusters())}) or a path to a .toml file")
        return _parse(_read_toml(path.read_bytes(), spec), spec)
    names = shipped_clusters()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown cluster {spec!r}{hint}; shipped clusters: {', '.join(names)}, "
            "or pass a path to a .toml description"
        )
    data = resources.files("pyddl.sim").joinpath(_SHIPPED_DIR).joinpath(f"{spec}.toml").read_bytes()
    return _parse(_read_toml(data, spec), spec)


def _read_toml(data: bytes, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise RuntimeError(
                "reading cluster descriptions needs Python 3.11+ (tomllib) or, on Python 3.10, "
                "the tomli package: pip install tomli"
            ) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cluster {where!r} is not valid TOML: {err}") from None


def _take(table: dict, cls, where: str, required: tuple[str, ...]) -> dict:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in table]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return dict(table)


def _positive(value, what: str, where: str, integer: bool = False, zero_ok: bool = False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{where}: {what} must be {kind} {bound}, got {value!r}")
    return value


def _parse(data: dict, where: str) -> Cluster:
    top = dict(data)
    levels_raw = top.pop("levels", None)
    device_raw = top.pop("device", None)
    comm_cpu_raw = top.pop("comm_cpu", {})
    _take(top, Cluster, where, ("name", "gpus_per_server", "servers"))
    if not isinstance(levels_raw, list) or not levels_raw:
        raise ValueError(f"{where}: needs at least one [[levels]] table (innermost first)")
    levels = []
    for i, raw in enumerate(levels_raw):
        at = f"{where} [[levels]] #{i + 1}"
        _take(raw, LevelSpec, at, ("name", "link_gbps", "latency_us"))
        _positive(raw["link_gbps"], "link_gbps", at)
        _positive(raw["latency_us"], "latency_us", at, zero_ok=True)
        _positive(raw.get("links", 1), "links", at, integer=True)
        if 0 < i < len(levels_raw) - 1:
            _positive(raw.get("size"), "size (units of the inner level per group)", at, integer=True)
        levels.append(LevelSpec(**raw))
    device = None
    if device_raw is not None:
        at = f"{where} [device]"
        _take(device_raw, DeviceSpec, at, ("name", "reference_model", "reference_batch",
                                           "reference_images_per_s", "memory_gb_per_s"))
        _positive(device_raw["reference_batch"], "reference_batch", at, integer=True)
        _positive(device_raw["reference_images_per_s"], "reference_images_per_s", at)
        _positive(device_raw["memory_gb_per_s"], "memory_gb_per_s", at)
        _positive(device_raw.get("step_overhead_us", 0.0), "step_overhead_us", at, zero_ok=True)
        device = DeviceSpec(**device_raw)
    comm_cpu = {}
    if not isinstance(comm_cpu_raw, dict):
        raise ValueError(f"{where}: comm_cpu must be tables [comm_cpu.native] / [comm_cpu.multiring]")
    for alg, raw in comm_cpu_raw.items():
        at = f"{where} [comm_cpu.{alg}]"
        if alg not in ("native", "multiring") or not isinstance(raw, dict):
            raise ValueError(f"{at}: comm_cpu tables are [comm_cpu.native] and [comm_cpu.multiring]")
        _take(raw, CommCpuSpec, at, ("per_call_us", "per_byte_ns"))
        comm_cpu[alg] = CommCpuSpec(float(_positive(raw["per_call_us"], "per_call_us", at, zero_ok=True)),
                                    float(_positive(raw["per_byte_ns"], "per_byte_ns", at, zero_ok=True)))
    g = _positive(top["gpus_per_server"], "gpus_per_server", where, integer=True)
    servers = _positive(top["servers"], "servers", where, integer=True)
    if servers > 1 and len(levels) < 2:
        raise ValueError(f"{where}: {servers} servers need a second [[levels]] table for the links between them")
    groups = math.prod(int(s.size) for s in levels[1:-1])
    if servers > groups and servers % groups:
        raise ValueError(f"{where}: {servers} servers do not fill whole groups of {groups} servers")
    if "reduce_gb_per_s" in top:
        _positive(top["reduce_gb_per_s"], "reduce_gb_per_s", where)
    _positive(top.get("multiring_stage_us", 0.0), "multiring_stage_us", where, zero_ok=True)
    return Cluster(
        name=str(top["name"]),
        gpus_per_server=g,
        servers=servers,
        levels=tuple(levels),
        device=device,
        reduce_gb_per_s=top.get("reduce_gb_per_s"),
        multiring_pipeline=bool(top.get("multiring_pipeline", True)),
        multiring_stage_us=float(top.get("multiring_stage_us", 0.0)),
        comm_cpu=comm_cpu,
        description=str(top.get("description", "")),
    )


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))  # also plain for numpy floats, whose repr names the type
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def cluster_to_toml(cluster: Cluster, comment: str = "") -> str:
    """Render `cluster` as TOML text that `load_cluster` reads back to an equal Cluster."""
    lines = [f"# {line}" for line in comment.splitlines()]
    top = {
        "name": cluster.name,
        "description": cluster.description,
        "gpus_per_server": cluster.gpus_per_server,
        "servers": cluster.servers,
        "multiring_pipeline": cluster.multiring_pipeline,
    }
    if cluster.multiring_stage_us:
        top["multiring_stage_us"] = cluster.multiring_stage_us
    if cluster.reduce_gb_per_s is not None:
        top["reduce_gb_per_s"] = cluster.reduce_gb_per_s
    lines += [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    if cluster.device is not None:
        lines += ["", "[device]"]
        lines += [f"{f.name} = {_toml_value(getattr(cluster.device, f.name))}" for f in fields(DeviceSpec)]
    for alg, spec in cluster.comm_cpu.items():
        lines += ["", f"[comm_cpu.{alg}]"]
        lines += [f"{f.name} = {_toml_value(getattr(spec, f.name))}" for f in fields(CommCpuSpec)]
    for spec in cluster.levels:
        lines += ["", "[[levels]]"]
        for f in fields(LevelSpec):
            value = getattr(spec, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
