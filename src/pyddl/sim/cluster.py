"""Cluster descriptions for `pyddl simulate`: servers, links per topology level, the device,
what the software stack costs beyond the wire (`[stack]`) and published results (`[[anchors]]`).

A description is a TOML file, shipped ones under pyddl/sim/clusters/ (select by name) or any
path; every bad value is a ValueError naming the file and the key. `Cluster.fabric(gpus)`
turns it into the cost model's `Fabric` for a job of that many GPUs laid out server by
server. Reading TOML needs Python 3.11 (tomllib) or `tomli` on 3.10.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from pyddl.sim.cost import ALGORITHMS, Fabric, Level

__all__ = ["LevelSpec", "DeviceSpec", "CommCpuSpec", "StackSpec", "AnchorSpec", "Cluster", "load_cluster",
           "shipped_clusters", "cluster_to_toml"]

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
class StackSpec:
    """What the cluster's software stack costs beyond the wire (`[stack]`; every term 0 by default).

    Attributes:
        name: the framework and library, e.g. "Caffe + PowerAI DDL over Spectrum MPI".
        bucket_mb: the framework's gradient grouping: MiB per collective, 0 for one collective
            per layer (Caffe's layer-wise reduce); None leaves pyddl's own buckets.
        chunk_mb: the library's pipeline chunk, None for pyddl's.
        call_us: software cost of one collective call (framework op, library entry, stream
            synchronisation), paid on the engine before each bucket's collective.
        staging_gb_per_s: where the library copies a bucket to host memory and back around a
            collective that crosses servers, the copy rate (each way); None: no staging.
        overlap: False where the framework starts reducing only after backward ends.
        step_cv: per-worker step-time spread, standard deviation / mean compute step; the
            synchronous step waits for the slowest worker (`cost.straggler_wait_s`).
        step_fixed_us: per-step host work paid at every worker count (data hand-off, ...).
        step_allreduces: small allreduces per step on the critical path (loss, metrics).
    """

    name: str = ""
    bucket_mb: float | None = None
    chunk_mb: float | None = None
    call_us: float = 0.0
    staging_gb_per_s: float | None = None
    overlap: bool = True
    step_cv: float = 0.0
    step_fixed_us: float = 0.0
    step_allreduces: int = 0


@dataclass(frozen=True)
class AnchorSpec:
    """A published scaling result on this cluster (`[[anchors]]`), checked by `--anchors`.

    `efficiency` is throughput(gpus) / (gpus / baseline_gpus x throughput(baseline_gpus)),
    as the source measured it.
    """

    name: str
    source: str
    efficiency: float
    model: str
    batch: int
    gpus: int
    algorithm: str
    baseline_gpus: int = 1
    num_classes: int = 1000
    image_size: int = 224
    ring_max: int | None = None


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
    stack: StackSpec = StackSpec()
    anchors: tuple[AnchorSpec, ...] = ()

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
        ValueError: unknown name, unreadable file, or a description with missing/bad fields
            (one line naming the file, the key and what was expected).
        RuntimeError: no TOML reader (Python 3.10 without `tomli`).

    Example:
        >>> load_cluster("powerai-ddl-2017").max_gpus
        256
    """
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise ValueError(f"cluster file {spec!r} is a directory; pass a .toml file or a shipped name "
                             f"({', '.join(shipped_clusters())})")
        if not path.is_file():
            raise ValueError(f"cluster file {spec!r} does not exist; pass a shipped name "
                             f"({', '.join(shipped_clusters())}) or a path to a .toml file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"cluster file {spec!r} cannot be read: {err.strerror}") from None
        return _parse(_read_toml(data, spec), f"cluster file {spec!r}")
    names = shipped_clusters()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown cluster {spec!r}{hint}; shipped clusters: {', '.join(names)}, "
            "or pass a path to a .toml description"
        )
    data = resources.files("pyddl.sim").joinpath(_SHIPPED_DIR).joinpath(f"{spec}.toml").read_bytes()
    return _parse(_read_toml(data, spec), f"cluster {spec!r}")


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


def _take(table, cls, where: str, required: tuple[str, ...]) -> dict:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of keys, got {table!r}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in table]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return dict(table)


# Plausible ranges, so that a typo (a link of 1e-300 Gbit/s, 1e9 servers) is an error naming the
# key instead of a prediction of centuries: (lowest, highest) of each number a file may state.
_RANGES = MappingProxyType({
    "link_gbps": (1e-3, 1e6), "latency_us": (0.0, 1e6), "links": (1, 1024), "size": (1, 10**6),
    "gpus_per_server": (1, 1024), "servers": (1, 10**6), "reference_batch": (1, 10**6),
    "reference_image_size": (8, 10**5), "reference_images_per_s": (1e-3, 1e9), "memory_gb_per_s": (0.1, 1e6),
    "step_overhead_us": (0.0, 1e6), "reduce_gb_per_s": (1e-3, 1e6), "multiring_stage_us": (0.0, 1e6),
    "per_call_us": (0.0, 1e7), "per_byte_ns": (0.0, 1e6), "bucket_mb": (0.0, 1e5), "chunk_mb": (1e-3, 1e5),
    "call_us": (0.0, 1e7), "staging_gb_per_s": (1e-3, 1e6), "step_cv": (0.0, 1.0), "step_fixed_us": (0.0, 1e8),
    "step_allreduces": (0, 10**4), "efficiency": (1e-3, 1.0), "batch": (1, 10**6), "gpus": (1, 10**7),
    "baseline_gpus": (1, 10**7), "num_classes": (1, 10**7), "image_size": (8, 10**5), "ring_max": (2, 10**6),
})


def _number(table: dict, key: str, where: str, integer: bool = False, default=None):
    """table[key] (or `default`) checked to be a number of the right kind inside _RANGES[key]."""
    value = table.get(key, default)
    lo, hi = _RANGES[key]
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{where}: {key} must be {kind} from {lo:g} to {hi:g}, got {value!r}")
    return value


def _string(table: dict, key: str, where: str, default=None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _choice(table: dict, key: str, where: str, choices: tuple[str, ...]) -> str:
    value = table.get(key)
    if value not in choices:
        raise ValueError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(table: dict, key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _parse(data: dict, where: str) -> Cluster:
    top = dict(data)
    levels_raw = top.pop("levels", None)
    device_raw = top.pop("device", None)
    comm_cpu_raw = top.pop("comm_cpu", {})
    stack_raw = top.pop("stack", {})
    anchors_raw = top.pop("anchors", [])
    _take(top, Cluster, where, ("name", "gpus_per_server", "servers"))
    if not isinstance(levels_raw, list) or not levels_raw or not all(isinstance(x, dict) for x in levels_raw):
        raise ValueError(f"{where}: levels must be [[levels]] tables, innermost first (at least one), "
                         f"got {levels_raw!r}")
    levels = []
    for i, raw in enumerate(levels_raw):
        at = f"{where} [[levels]] #{i + 1}"
        _take(raw, LevelSpec, at, ("name", "link_gbps", "latency_us"))
        size = None
        if 0 < i < len(levels_raw) - 1:
            if "size" not in raw:
                raise ValueError(f"{at}: a middle level needs size (units of the inner level per group)")
            size = _number(raw, "size", at, integer=True)
        levels.append(LevelSpec(_string(raw, "name", at), float(_number(raw, "link_gbps", at)),
                                float(_number(raw, "latency_us", at)), _number(raw, "links", at, True, 1), size))
    device = None
    if device_raw is not None:
        at = f"{where} [device]"
        _take(device_raw, DeviceSpec, at, ("name", "reference_model", "reference_batch",
                                           "reference_images_per_s", "memory_gb_per_s"))
        device = DeviceSpec(
            _string(device_raw, "name", at), _string(device_raw, "reference_model", at),
            _number(device_raw, "reference_batch", at, integer=True),
            float(_number(device_raw, "reference_images_per_s", at)),
            float(_number(device_raw, "memory_gb_per_s", at)),
            _number(device_raw, "reference_image_size", at, True, 224),
            float(_number(device_raw, "step_overhead_us", at, default=0.0)))
    comm_cpu = {}
    if not isinstance(comm_cpu_raw, dict):
        raise ValueError(f"{where}: comm_cpu must be tables [comm_cpu.native] / [comm_cpu.multiring], "
                         f"got {comm_cpu_raw!r}")
    for alg, raw in comm_cpu_raw.items():
        at = f"{where} [comm_cpu.{alg}]"
        if alg not in ("native", "multiring") or not isinstance(raw, dict):
            raise ValueError(f"{at}: comm_cpu tables are [comm_cpu.native] and [comm_cpu.multiring]")
        _take(raw, CommCpuSpec, at, ("per_call_us", "per_byte_ns"))
        comm_cpu[alg] = CommCpuSpec(float(_number(raw, "per_call_us", at)), float(_number(raw, "per_byte_ns", at)))
    g = _number(top, "gpus_per_server", where, integer=True)
    servers = _number(top, "servers", where, integer=True)
    if servers > 1 and len(levels) < 2:
        raise ValueError(f"{where}: {servers} servers need a second [[levels]] table for the links between them")
    groups = math.prod(int(s.size) for s in levels[1:-1])
    if servers > groups and servers % groups:
        raise ValueError(f"{where}: {servers} servers do not fill whole groups of {groups} servers")
    reduce_gb = float(_number(top, "reduce_gb_per_s", where)) if "reduce_gb_per_s" in top else None
    return Cluster(
        name=_string(top, "name", where),
        gpus_per_server=g,
        servers=servers,
        levels=tuple(levels),
        device=device,
        reduce_gb_per_s=reduce_gb,
        multiring_pipeline=_bool(top, "multiring_pipeline", where, True),
        multiring_stage_us=float(_number(top, "multiring_stage_us", where, default=0.0)),
        comm_cpu=comm_cpu,
        description=_string(top, "description", where, ""),
        stack=_parse_stack(stack_raw, f"{where} [stack]"),
        anchors=_parse_anchors(anchors_raw, where),
    )


def _parse_stack(raw, at: str) -> StackSpec:
    _take(raw, StackSpec, at, ())

    def optional(key: str) -> float | None:
        return float(_number(raw, key, at)) if key in raw else None

    return StackSpec(
        name=_string(raw, "name", at, ""),
        bucket_mb=optional("bucket_mb"),
        chunk_mb=optional("chunk_mb"),
        call_us=float(_number(raw, "call_us", at, default=0.0)),
        staging_gb_per_s=optional("staging_gb_per_s"),
        overlap=_bool(raw, "overlap", at, True),
        step_cv=float(_number(raw, "step_cv", at, default=0.0)),
        step_fixed_us=float(_number(raw, "step_fixed_us", at, default=0.0)),
        step_allreduces=_number(raw, "step_allreduces", at, True, 0),
    )


def _parse_anchors(raw, where: str) -> tuple[AnchorSpec, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: anchors must be [[anchors]] tables, got {raw!r}")
    out = []
    for i, table in enumerate(raw):
        at = f"{where} [[anchors]] #{i + 1}"
        _take(table, AnchorSpec, at, ("name", "source", "efficiency", "model", "batch", "gpus", "algorithm"))
        out.append(AnchorSpec(
            name=_string(table, "name", at), source=_string(table, "source", at),
            efficiency=float(_number(table, "efficiency", at)), model=_string(table, "model", at),
            batch=_number(table, "batch", at, integer=True), gpus=_number(table, "gpus", at, integer=True),
            algorithm=_choice(table, "algorithm", at, ALGORITHMS),
            baseline_gpus=_number(table, "baseline_gpus", at, True, 1),
            num_classes=_number(table, "num_classes", at, True, 1000),
            image_size=_number(table, "image_size", at, True, 224),
            ring_max=_number(table, "ring_max", at, integer=True) if "ring_max" in table else None,
        ))
    return tuple(out)


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
    if cluster.stack != StackSpec():
        lines += ["", "[stack]"]
        lines += [f"{f.name} = {_toml_value(getattr(cluster.stack, f.name))}" for f in fields(StackSpec)
                  if getattr(cluster.stack, f.name) is not None]
    for alg, spec in cluster.comm_cpu.items():
        lines += ["", f"[comm_cpu.{alg}]"]
        lines += [f"{f.name} = {_toml_value(getattr(spec, f.name))}" for f in fields(CommCpuSpec)]
    for spec in cluster.levels:
        lines += ["", "[[levels]]"]
        for f in fields(LevelSpec):
            value = getattr(spec, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
    for anchor in cluster.anchors:
        lines += ["", "[[anchors]]"]
        lines += [f"{f.name} = {_toml_value(getattr(anchor, f.name))}" for f in fields(AnchorSpec)
                  if getattr(anchor, f.name) is not None]
    return "\n".join(lines) + "\n"
