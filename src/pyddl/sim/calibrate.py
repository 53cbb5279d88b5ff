"""Fit the cost model to measurements, and hold its predictions against measurements.

`fit_bench` fits each topology level's latency and link rate, and the reduction cost, to the
rows of `pyddl bench allreduce --json` by least squares on log time (Levenberg-Marquardt with
a weak prior). A parameter the rows cannot pin down (e.g. a flat ring shows its wire time and
its reduction cost only as their sum) leans on its prior and is reported as not identified.
`compare_allreduce` and `compare_steps` pair predicted with measured times and their ratio.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace

import numpy as np

from pyddl.sim.cluster import Cluster, CommCpuSpec, LevelSpec
from pyddl.sim.cost import DEFAULT_CHUNK_BYTES, Fabric, Level, allreduce_s

__all__ = [
    "BenchRun",
    "FitParam",
    "Fit",
    "load_bench",
    "median_of_runs",
    "load_measured_steps",
    "fit_bench",
    "fit_comm_cpu",
    "fitted_cluster",
    "compare_allreduce",
    "compare_steps",
]

# Rows the cost model can price; "auto" is modelled as the faster of the two per size.
_FITTABLE = ("native", "multiring", "auto")
# The prior lets each log-parameter roam about e^3 (20x) around its starting value.
_PRIOR_LOG_SD = 3.0
# A parameter counts as determined when its posterior spread is below +-10%.
_IDENTIFIED_LOG_SD = 0.1


@dataclass(frozen=True)
class BenchRun:
    """One `pyddl bench allreduce --json` file: the job's layout and its rows."""

    path: str
    world_size: int
    dims: tuple[int, ...]
    backend: str
    link_gbps: float | None
    rows: tuple[dict, ...]
    # Ranks per core on the bench's machine, at least 1 (meta.host: 4 ranks on 2 cores -> 2).
    host_load: float = 1.0


def load_bench(path: str) -> BenchRun:
    """Read and check a bench JSON ({"meta": {...}, "rows": [...]}).

    Raises:
        ValueError: missing file, not JSON, or missing/inconsistent fields (named).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"bench file {path!r} does not exist; write one with "
                         "`pyddl bench allreduce --json PATH`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"bench file {path!r} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"bench file {path!r} needs the keys 'meta' (an object) and 'rows' (a list), "
                         "as `pyddl bench allreduce --json` writes them")
    meta = data["meta"]
    world = meta.get("world_size")
    dims = tuple(meta.get("dims") or ([world] if world else []))
    if not isinstance(world, int) or world < 1 or not dims or math.prod(dims) != world:
        raise ValueError(f"bench file {path!r}: meta.world_size {world!r} and meta.dims {meta.get('dims')!r} "
                         "must be a positive rank count and dims that multiply to it")
    for i, row in enumerate(data["rows"]):
        missing = [k for k in ("algorithm", "bytes", "median_s") if k not in row]
        if missing:
            raise ValueError(f"bench file {path!r}: row {i} lacks {', '.join(missing)}")
        if row.get("dtype", "float32") != "float32":
            # The reduction's cost per byte depends on the element type (Gloo sums fp16
            # element by element); the model's is fitted and predicted for float32.
            raise ValueError(f"bench file {path!r}: row {i} moved {row['dtype']}; calibrate on float32 rows "
                             "(pyddl bench allreduce without --dtype)")
    # The fit is of the collective itself: the rows of a tensor made per call add its allocation.
    rows = tuple(r for r in data["rows"] if r.get("tensor", "reused") == "reused")
    emulate = meta.get("emulate") or {}
    host = meta.get("host") or {}
    load = host.get("ranks", 1) / host.get("cpus", 1) if host.get("cpus", 0) > 0 else 1.0
    return BenchRun(path, world, dims, str(meta.get("backend", "gloo")),
                    emulate.get("link_gbps"), rows, max(1.0, float(load)))


def median_of_runs(runs: list[BenchRun]) -> BenchRun:
    """Several runs of one bench (same layout, same rows) as one: each row's median time is
    the median over the runs, its min_s the least. On a shared machine the state moves between
    runs minutes apart by 10-20% at 1 MiB; one run is one draw of it.

    Raises:
        ValueError: the runs differ in layout, host load or rows (the first such file named).
    """
    first = runs[0]
    key = [(r["algorithm"], r["bytes"]) for r in first.rows]
    for run in runs[1:]:
        if (run.dims, run.backend, run.link_gbps, run.host_load) != (first.dims, first.backend, first.link_gbps,
                                                                      first.host_load):
            raise ValueError(f"bench files {first.path!r} and {run.path!r} ran different layouts "
                             f"({'x'.join(map(str, first.dims))} and {'x'.join(map(str, run.dims))}, or another "
                             "link, backend or host load): pass runs of one layout")
        if [(r["algorithm"], r["bytes"]) for r in run.rows] != key:
            raise ValueError(f"bench files {first.path!r} and {run.path!r} hold different rows (sizes or "
                             "algorithms): run both with the same --sizes and --algorithms")
    if len(runs) == 1:
        return first
    rows = tuple({**r, "median_s": statistics.median(run.rows[i]["median_s"] for run in runs),
                  "min_s": min(run.rows[i].get("min_s", run.rows[i]["median_s"]) for run in runs)}
                 for i, r in enumerate(first.rows))
    return replace(first, path=",".join(run.path for run in runs), rows=rows)


def load_measured_steps(path: str) -> list[dict]:
    """Read measured step times: a list (or {"rows": [...]}) of {gpus, algorithm, step_s}, or
    the JSON of `pyddl bench step` / `pyddl bench scaling` (its pyddl-<algorithm> rows without a
    wire codec are used: the simulator models fp32 gradients).

    From a bench file, each row also carries `compute_s`, the same run's step time of the same
    workers with communication skipped (its pyddl-noop row), and `gpus_per_server`, the
    emulated layout (`ranks_per_server`), when the file has them.

    Raises:
        ValueError: missing file, not JSON, or rows without those keys.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"measured-steps file {path!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"measured-steps file {path!r} is not JSON: {err}") from None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"measured-steps file {path!r} needs a non-empty list of rows "
                         "(or {\"rows\": [...]}) with gpus, algorithm and step_s")
    bench = [r for r in rows if isinstance(r, dict) and "system" in r and "median_step_s" in r]
    if bench:
        noop = {r["workers"]: r["median_step_s"] for r in bench if r["system"] == "pyddl-noop"}
        per_server = data.get("ranks_per_server") if isinstance(data, dict) else None
        rows = [{"gpus": r["workers"], "algorithm": r["system"].split("-", 1)[1], "step_s": r["median_step_s"],
                 **({"compute_s": noop[r["workers"]]} if r["workers"] in noop else {}),
                 **({"gpus_per_server": per_server} if per_server else {})}
                for r in bench if r["system"] in ("pyddl-native", "pyddl-multiring", "pyddl-auto")]
        if not rows:
            raise ValueError(f"measured-steps file {path!r} has no pyddl-native, pyddl-multiring or pyddl-auto rows")
    out = []
    for i, row in enumerate(rows):
        gpus = row.get("gpus", row.get("world_size")) if isinstance(row, dict) else None
        if not isinstance(gpus, int) or "algorithm" not in row or not isinstance(row.get("step_s"), (int, float)):
            raise ValueError(f"measured-steps file {path!r}: row {i} needs gpus (int), algorithm and step_s")
        out.append({**{k: row[k] for k in ("compute_s", "gpus_per_server") if k in row},
                    "gpus": gpus, "algorithm": row["algorithm"], "step_s": float(row["step_s"])})
    return out


@dataclass(frozen=True)
class FitParam:
    """One fitted parameter; `identified` is False when it kept its prior value."""

    name: str
    value: float
    unit: str
    identified: bool


@dataclass(frozen=True)
class Fit:
    """Fitted links per level (innermost first) and reduction cost, and the fit's quality.

    `dims` is the largest layout the fitted runs cover (per level, the most ranks any run
    had there); `fabric()` lays a job out on the fitted links.
    """

    levels: tuple[Level, ...]
    gamma_s_per_byte: float
    stage_s: float
    dims: tuple[int, ...]
    params: tuple[FitParam, ...]
    rms_log_error: float
    rows_used: int
    rows_skipped: int
    pipeline: bool
    chunk_bytes: int

    def fabric(self, dims: tuple[int, ...] | None = None) -> Fabric:
        """The fitted links under `dims` (default: the fit's largest layout)."""
        dims = tuple(dims or self.dims)
        if len(dims) > len(self.levels):
            raise ValueError(f"dims {dims} have more levels than the fit's {len(self.levels)}")
        return Fabric(self.levels[: len(dims)], dims, self.gamma_s_per_byte, self.stage_s)


def _level_name(j: int, n: int) -> str:
    return "intra-server" if j == 0 else ("inter-server" if n == 2 else f"level{j}")


def _prior(runs: list[BenchRun]) -> tuple[list[str], np.ndarray]:
    """Parameter names and prior values: alpha and rate per level some run uses, then gamma
    and the multiring's host time per stage and chunk."""
    depth = max(len(r.dims) for r in runs)
    link_gbps = next((r.link_gbps for r in runs if r.link_gbps), None) or 10.0
    names, values = [], []
    for j in range(depth):
        if all(len(r.dims) <= j or r.dims[j] == 1 for r in runs):
            continue
        # Priors: 50 us per message; loopback inside a server ~5 GB/s; the emulated link's
        # stated rate between servers (10 Gbit/s if unknown); ~1 GB/s reduction on a CPU core;
        # 100 us of Python per multiring stage and chunk.
        names += [f"alpha{j}", f"rate{j}"]
        values += [50e-6, 5e9 if j == 0 else link_gbps * 1e9 / 8]
    names += ["gamma", "sigma"]
    values += [1e-9, 100e-6]
    return names, np.array(values)


def _levels(depth: int, names: list[str], values) -> tuple[tuple[Level, ...], float, float]:
    p = dict(zip(names, map(float, values)))
    levels = tuple(
        Level(_level_name(j, depth), p.get(f"alpha{j}", 0.0), p.get(f"rate{j}", 1e9)) for j in range(depth)
    )
    return levels, p["gamma"], p["sigma"]


def _lm(fun, x0: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Minimise |fun(x)|^2 by Levenberg-Marquardt with a forward-difference Jacobian."""
    x, r = x0.copy(), fun(x0)
    cost, damping = float(r @ r), 1e-3
    for _ in range(max_iter):
        jac = _jacobian(fun, x, r)
        a, g = jac.T @ jac, jac.T @ r
        improved = done = False
        while damping < 1e12:
            step = np.linalg.solve(a + damping * (np.diag(np.diag(a)) + 1e-12 * np.eye(len(x))), -g)
            r_new = fun(x + step)
            c_new = float(r_new @ r_new)
            if c_new < cost:
                x, r, improved = x + step, r_new, True
                damping = max(damping / 3, 1e-12)
                done = cost - c_new < 1e-15 * max(cost, 1e-30) or np.max(np.abs(step)) < 1e-10
                cost = c_new
                break
            damping *= 4
        if not improved or done:
            break
    return x


def _jacobian(fun, x: np.ndarray, r: np.ndarray, h: float = 1e-6) -> np.ndarray:
    cols = []
    for i in range(len(x)):
        dx = np.zeros_like(x)
        dx[i] = h
        cols.append((fun(x + dx) - r) / h)
    return np.stack(cols, axis=1)


def fit_bench(runs, chunk_bytes: int = DEFAULT_CHUNK_BYTES, pipeline: bool | None = None,
              noise: float = 0.02) -> Fit:
    """Fit latency and link rate per level, and the reduction cost, to bench rows.

    A maximum-a-posteriori fit on log times: each row's log time has spread `noise`, or more
    where the row's own samples scatter more (log(median / min), from the bench's `min_s`:
    on a shared machine small messages scatter by 50% and more while 64 MiB rows agree within
    2%, and equal weights let the noisy rows set the link rate), each log-parameter a wide
    prior around a generic value. Several runs share one parameter set
    per level (level 0 inside a server, level 1 between servers, ...), so runs of simple
    layouts (2 ranks in one server; 1 rank on each of 2 servers) can calibrate a model that is
    then held against a layout it never saw (2x2). The host costs (reduction, multiring stage)
    are fitted for a rank with a core to itself: a run with more ranks than cores on its
    machine sees them multiplied by its `host_load`. A parameter whose posterior spread stays
    above +-10% is reported as not identified (its value leans on the prior).

    Args:
        runs: one `BenchRun` or a list of them (same backend).
        chunk_bytes: the multiring chunk the bench ran with (pyddl's default 2 MiB).
        pipeline: whether the multiring pipelined its chunks; default: unless on NCCL.
        noise: relative spread of one row's median time (about 2% for bench medians).

    Raises:
        ValueError: fewer usable rows than parameters, only single-rank runs, or runs on
            different backends.
    """
    runs = [runs] if isinstance(runs, BenchRun) else list(runs)
    if len({r.backend for r in runs}) > 1:
        raise ValueError("bench files from different backends cannot share one fit: "
                         + ", ".join(f"{r.path} ({r.backend})" for r in runs))
    if all(r.world_size < 2 for r in runs):
        raise ValueError("every bench file ran on 1 rank: nothing to fit")
    if pipeline is None:
        pipeline = runs[0].backend != "nccl"
    rows = [(run, r) for run in runs for r in run.rows
            if r["algorithm"] in _FITTABLE and r["bytes"] > 0 and r["median_s"] > 0]
    names, prior = _prior(runs)
    if len(rows) < len(names):
        raise ValueError(f"{len(rows)} usable rows for {len(names)} parameters; bench more sizes, "
                         "e.g. --sizes 4K,64K,1M,16M,64M --algorithms native,multiring")
    depth = max(len(r.dims) for r in runs)
    measured = np.log([r["median_s"] for _, r in rows])
    spread = np.array([max(noise, math.log(r["median_s"] / r["min_s"])) if 0 < r.get("min_s", 0) <= r["median_s"]
                       else noise for _, r in rows])
    weight = noise / spread
    x0 = np.log(prior)

    def log_errors(x):
        levels, gamma, sigma = _levels(depth, names, np.exp(x))
        fabrics = {run.path: Fabric(levels[: len(run.dims)], run.dims, gamma, sigma).with_host_load(run.host_load)
                   for run in runs}
        pred = [allreduce_s(fabrics[run.path], r["algorithm"], r["bytes"], chunk_bytes, pipeline) for run, r in rows]
        return np.log(pred) - measured

    def data_residuals(x):
        return log_errors(x) * weight

    prior_weight = (noise / _PRIOR_LOG_SD) ** 2

    def residuals(x):
        return np.concatenate([data_residuals(x), math.sqrt(prior_weight) * (x - x0)])

    x = _lm(residuals, x0)
    r = data_residuals(x)
    jac = _jacobian(data_residuals, x, r)
    cov = noise**2 * np.linalg.inv(jac.T @ jac + prior_weight * np.eye(len(x)))
    identified = np.sqrt(np.diag(cov)) < _IDENTIFIED_LOG_SD
    values = np.exp(x)
    params = tuple(
        FitParam(name, float(value), {"alpha": "s", "rate": "B/s", "gamma": "s/B", "sigma": "s"}[name.rstrip("0123456789")],
                 bool(ok))
        for name, value, ok in zip(names, values, identified)
    )
    levels, gamma, sigma = _levels(depth, names, values)
    dims = tuple(max((run.dims[j] if j < len(run.dims) else 1) for run in runs) for j in range(depth))
    rms = float(np.sqrt(np.mean(log_errors(x) ** 2)))
    total = sum(len(run.rows) for run in runs)
    return Fit(levels, gamma, sigma, dims, params, rms, len(rows), total - len(rows), pipeline, chunk_bytes)


def fit_comm_cpu(runs) -> dict[str, CommCpuSpec]:
    """Fit the CPU time one rank spends on one allreduce, per algorithm: per call plus per byte.

    From the bench rows' `cpu_s` (the process's CPU time, every thread and the kernel's work
    charged to them) of Gloo runs across servers with a core per rank: what communication
    takes from compute where the two share the cores, as on the emulated bed. A least-squares
    line on relative error, cpu = a + b x bytes, held at a, b >= 0. Algorithms with fewer
    than 2 such rows are left out; NCCL runs give nothing (the GPU computes, not the CPU).
    """
    runs = [runs] if isinstance(runs, BenchRun) else list(runs)
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if run.backend != "gloo" or run.host_load > 1 or len(run.dims) < 2 or math.prod(run.dims[1:]) < 2:
            continue
        for r in run.rows:
            if r["algorithm"] in ("native", "multiring") and r.get("cpu_s", 0) > 0 and r["bytes"] > 0:
                points.setdefault(r["algorithm"], []).append((float(r["bytes"]), float(r["cpu_s"])))
    out = {}
    for alg, pts in points.items():
        if len({b for b, _ in pts}) < 2:
            continue
        a = np.array([[1 / c, b / c] for b, c in pts])  # rows scaled so the target is 1
        call, byte = np.linalg.lstsq(a, np.ones(len(pts)), rcond=None)[0]
        if call < 0 or byte < 0:  # one term alone: the better of the two
            (err_c, call), (err_b, byte) = (_one_term(a[:, 0]), _one_term(a[:, 1]))
            call, byte = (call, 0.0) if err_c < err_b else (0.0, byte)
        out[alg] = CommCpuSpec(float(call) * 1e6, float(byte) * 1e9)
    return out


def _one_term(column: np.ndarray) -> tuple[float, float]:
    """(squared error, k >= 0) of the least-squares k with column x k = 1."""
    k = max(0.0, float(np.sum(column) / np.sum(column**2)))
    return float(np.sum((column * k - 1) ** 2)), k


def fitted_cluster(fit: Fit, name: str, comm_cpu: dict[str, CommCpuSpec] | None = None) -> Cluster:
    """Turn a fit into a cluster description (no [device]: pair it with a step profile);
    `comm_cpu` is `fit_comm_cpu`'s result, for beds where communication shares the cores."""
    dims = fit.dims
    levels = tuple(
        LevelSpec(lv.name, lv.link_Bps * 8 / 1e9, lv.latency_s * 1e6, 1, dims[j] if 0 < j < len(dims) - 1 else None)
        for j, lv in enumerate(fit.levels)
    )
    return Cluster(
        name=name,
        gpus_per_server=dims[0],
        servers=math.prod(dims[1:]),
        levels=levels,
        device=None,
        reduce_gb_per_s=1.0 / fit.gamma_s_per_byte / 1e9 if fit.gamma_s_per_byte > 0 else None,
        multiring_pipeline=fit.pipeline,
        multiring_stage_us=fit.stage_s * 1e6,
        comm_cpu=dict(comm_cpu or {}),
        description=f"fitted by pyddl simulate --calibrate ({fit.rows_used} rows, rms log error {fit.rms_log_error:.3f})",
    )


def compare_allreduce(fabric: Fabric, run: BenchRun, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      pipeline: bool = True) -> list[dict]:
    """Predict every priced row of `run` on `fabric`: measured, predicted, ratio (pred/meas).

    The fabric's host costs are multiplied by the run's `host_load` (ranks per core).

    Raises:
        ValueError: the fabric's rank count differs from the bench job's.
    """
    if fabric.size != run.world_size:
        raise ValueError(f"the cluster lays out {fabric.size} ranks but bench file {run.path!r} ran "
                         f"{run.world_size}; pass --gpus {run.world_size} or a matching cluster")
    fabric = fabric.with_host_load(run.host_load)
    out = []
    for r in run.rows:
        if r["algorithm"] not in _FITTABLE or r["bytes"] <= 0 or r["median_s"] <= 0:
            continue
        pred = allreduce_s(fabric, r["algorithm"], r["bytes"], chunk_bytes, pipeline)
        out.append({"algorithm": r["algorithm"], "bytes": r["bytes"], "measured_s": r["median_s"],
                    "predicted_s": pred, "ratio": pred / r["median_s"]})
    return out


def compare_steps(profile, cluster: Cluster, measured: list[dict], bucket_bytes: int,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, ring_max: int | None = None) -> list[dict]:
    """Predict each measured step (`load_measured_steps` rows) and pair the two.

    A row's `gpus_per_server` lays the cluster out as the measurement ran (one pinned rank per
    emulated server, say). A row's `compute_s` (the same workers' step with no communication)
    rescales the profile's compute first: processes sharing a machine slow each other down
    (ANCHORS.md: two ranks, no communication, ~10%), which a profile of one idle rank cannot
    know; what remains to predict is what communication adds. Each result row also holds the
    measured and predicted communication overhead (step minus compute).
    """
    from pyddl.sim.step import predict_scaling  # here: pyddl.sim.step imports torch

    single = profile.forward_s + profile.backward_s + profile.optimizer_s
    out = []
    for m in measured:
        cl = replace(cluster, gpus_per_server=m["gpus_per_server"]) if m.get("gpus_per_server") else cluster
        prof = profile.scaled(m["compute_s"] / single, "measured no-communication step") if "compute_s" in m else profile
        p = predict_scaling(prof, cl, [m["gpus"]], [m["algorithm"]], bucket_bytes, chunk_bytes, ring_max)[0]
        row = {"gpus": m["gpus"], "algorithm": m["algorithm"], "topology": p["topology"], "measured_s": m["step_s"],
               "predicted_s": p["step_s"], "ratio": p["step_s"] / m["step_s"]}
        if "compute_s" in m:
            row.update(compute_s=m["compute_s"], measured_comm_s=m["step_s"] - m["compute_s"],
                       predicted_comm_s=p["step_s"] - m["compute_s"], predicted_comm_cpu_s=p["comm_cpu_s"])
        out.append(row)
    return out
