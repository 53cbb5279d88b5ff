"""Allreduce benchmark: median time, CPU time, algorithm and bus bandwidth per size and algorithm.

Run inside a job (`pyddl run -np 4 pyddl bench allreduce`, or `pyddl bench allreduce -np 4`
which launches itself). Bus bandwidth follows nccl-tests: busbw = algbw x 2(n-1)/n. When the
servers' link rate B is known (the emulated cluster sets it), each row also gets the physical
bound of DESIGN.md, T_min = 2(M-1)/M x S / B on M servers, and the ratio T_min / T_measured;
with the servers in R racks behind uplinks of B2 (emulated racks), the larger of that and the
uplinks' own bound 2(R-1)/R x S / B2.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time

import torch

import pyddl
from pyddl.bench.options import DTYPE_NAMES, TENSORS, parse_dtype_name
from pyddl.comm.codecs import get_codec
from pyddl.config import PYDDL_LINK_GBPS, PYDDL_RACK_GBPS, PYDDL_RACKS

__all__ = ["parse_dtype", "bound_s", "bound_levels_s", "calls_per_sample", "bench_allreduce", "bench_backend",
           "format_table", "DTYPES", "SPREAD_LIMIT"]

# torch's dtype for each of the bench's element types (pyddl.bench.options.DTYPE_NAMES).
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# A row whose samples' interquartile range exceeds this fraction of their median, or that
# beats the physical bound, is marked unreliable: the machine was busy, not the allreduce slow.
SPREAD_LIMIT = 0.25


def parse_dtype(text: str) -> torch.dtype:
    """Parse "float32", "float16" or "bfloat16" (also "fp32", "fp16", "bf16")."""
    return DTYPES[parse_dtype_name(text)]


def bound_s(nbytes: int, servers: int, link_gbps: float) -> float:
    """The fastest any allreduce of `nbytes` can be when each of `servers` NICs moves
    `link_gbps` Gbit/s each way and links inside a server are free: 2(M-1)/M x S / B."""
    if servers <= 1:
        return 0.0
    return 2 * (servers - 1) / servers * nbytes * 8 / (link_gbps * 1e9)


def bound_levels_s(nbytes: int, servers: int, link_gbps: float | None, racks: int = 1,
                   rack_gbps: float | None = None) -> float:
    """The fastest any allreduce of `nbytes` can be on `servers` NICs of `link_gbps` that fill
    `racks` racks, each behind one uplink of `rack_gbps` (both each way): every level's links
    must carry their share, so the larger of 2(M-1)/M x S / B and 2(R-1)/R x S / B2.

    A level whose rate is None (unlimited) or that has one member (one server, one rack) bounds
    nothing; with neither, the bound is 0. `bound_s` is the case of one rack.

    Example:
        >>> bound_levels_s(2**20, 4, 1.0, 2, 0.25) == bound_s(2**20, 2, 0.25)  # the uplink's
        True
    """
    terms = [0.0]
    if link_gbps:
        terms.append(bound_s(nbytes, servers, link_gbps))
    if rack_gbps:
        terms.append(bound_s(nbytes, racks, rack_gbps))
    return max(terms)


SAMPLE_S = 0.02  # a timed sample lasts at least this long: back-to-back calls, averaged
MAX_CALLS = 64   # ... of at most this many calls


def calls_per_sample(call_s: float, sample_s: float = SAMPLE_S, max_calls: int = MAX_CALLS) -> int:
    """How many back-to-back calls one timed sample averages, from one call's time: enough to
    last `sample_s` (a 4 KiB allreduce timed alone scatters by 2-4x with the barrier's exit
    skew and wake-ups; an average over 20 ms does not), one for calls longer than that."""
    if not call_s > 0:
        return max_calls
    return max(1, min(max_calls, math.ceil(sample_s / call_s)))


def bench_allreduce(sizes: list[int], algorithms: list[str], iters: int, warmup: int, link_gbps: float | None,
                    dtype: torch.dtype = torch.float32, tensors: list[str] = TENSORS, racks: int = 1,
                    rack_gbps: float | None = None, compression: str | None = None) -> list[dict]:
    """Time each (size, algorithm, tensor kind) on this job; every rank returns the same rows
    (rank 0's view of the slowest rank's median, since an allreduce ends when its last rank
    does). A size is in bytes of `dtype` elements; `tensors` are kinds of TENSORS;
    `compression` the wire codec of every call (None: the job's setting), whose bound is that of
    the bytes on the wire.

    Each of the `iters` samples starts at a barrier and times k calls back to back, as
    nccl-tests does; k (`calls_per_sample`, the same on every rank) is 1 for calls of 20 ms
    and more. A row's times and CPU are per call; its bound is bound_levels_s's."""
    n = pyddl.size()
    servers = pyddl.cross_size()
    name = str(dtype).removeprefix("torch.")
    device = pyddl.device()
    compression = compression or pyddl.settings().compression
    codec = get_codec(compression)
    wire_itemsize = codec.wire_dtype.itemsize if codec.applies_to(torch.ones(1, dtype=dtype)) else dtype.itemsize
    rows = []
    for nbytes in sizes:
        numel = max(1, nbytes // dtype.itemsize)
        x = torch.ones(numel, dtype=dtype, device=device)
        for alg in algorithms:
            calls = {
                "reused": lambda: pyddl.allreduce_(x, algorithm=alg, compression=compression),
                "fresh": lambda: pyddl.allreduce_(torch.ones(numel, dtype=dtype, device=device), algorithm=alg,
                                                  compression=compression),
                "out": lambda: pyddl.allreduce(torch.ones(numel, dtype=dtype, device=device), algorithm=alg,
                                               compression=compression),
            }
            for kind in tensors:
                row = _row(alg, nbytes, name, _measure(calls[kind], iters, warmup), n, servers, link_gbps,
                           racks=racks, rack_gbps=rack_gbps, wire_bytes=numel * wire_itemsize)
                rows.append({**row, "tensor": kind, "compression": codec.name})
    return rows


def _measure(call, iters: int, warmup: int) -> tuple[float, float, float, int, float]:
    """Time `call` (a collective) as bench_allreduce describes: (median s, min s, CPU s per call,
    calls per sample, samples' interquartile range / median), each the slowest rank's."""
    for _ in range(warmup):
        call()
    pyddl.barrier()
    t0 = time.perf_counter()
    call()  # one untimed call sizes the samples
    probe = time.perf_counter() - t0
    calls = calls_per_sample(float(pyddl.allreduce(torch.tensor([probe], dtype=torch.float64), op="max")))
    samples, cpu = [], []
    for _ in range(iters):
        pyddl.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - t0) / calls)
        cpu.append((time.process_time() - c0) / calls)
    median = statistics.median(samples)
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
    stats = [median, min(samples), statistics.median(cpu), (quartiles[2] - quartiles[0]) / median]
    worst = pyddl.allreduce(torch.tensor(stats, dtype=torch.float64), op="max")
    median_s, min_s, cpu_s, spread = (float(v) for v in worst)
    return median_s, min_s, cpu_s, calls, spread


def _row(label: str, nbytes: int, dtype_name: str, measured, n: int, servers: int, link_gbps: float | None,
         half: bool = False, racks: int = 1, rack_gbps: float | None = None, wire_bytes: int | None = None) -> dict:
    """One table row; `half`: a reduce-scatter, which moves half an allreduce's bytes (its bus
    bandwidth and bound are halved likewise); `racks`, `rack_gbps`: see bound_levels_s;
    `wire_bytes`: what a compressed call puts on the wire for `nbytes`, which sets the bound."""
    median_s, min_s, cpu_s, calls, spread = measured
    algbw = nbytes / median_s / 1e9
    share = 0.5 if half else 1.0
    row = {
        "algorithm": label,
        "bytes": nbytes,
        "dtype": dtype_name,
        "median_s": median_s,
        "min_s": min_s,
        "cpu_s": cpu_s,  # this process's CPU time (every thread), median, slowest rank
        "calls_per_sample": calls,
        "spread": spread,
        "algbw_gbps": algbw * 8,
        "busbw_gbps": algbw * 8 * 2 * (n - 1) / n * share,
        "bound_s": None,
        "bound_ratio": None,
    }
    bound = bound_levels_s(nbytes if wire_bytes is None else wire_bytes, servers, link_gbps, racks, rack_gbps)
    if bound:  # 0: no level's rate is known, or one server has no inter-server link to bound by
        row["bound_s"] = bound * share
        row["bound_ratio"] = row["bound_s"] / median_s
    row["unreliable"] = spread > SPREAD_LIMIT or (row["bound_ratio"] or 0.0) > 1.0
    return row


def bench_backend(sizes: list[int], algorithms: list[str], iters: int, warmup: int, link_gbps: float | None,
                  dtype: torch.dtype = torch.float32, racks: int = 1, rack_gbps: float | None = None) -> list[dict]:
    """Time dist.all_reduce ("ar/...") and dist.reduce_scatter_tensor ("rs/...") through a group
    of backend "pyddl" per algorithm and through a Gloo group of the same ranks, as a DDP or
    FSDP2 user would call them (docs/backend.md). Rows as bench_allreduce's."""
    import torch.distributed as dist

    import pyddl.torch  # noqa: F401  (registers backend "pyddl")

    n, servers = pyddl.size(), pyddl.cross_size()
    groups = {"gloo": dist.new_group(backend="gloo")}
    for alg in algorithms:
        os.environ["PYDDL_ALLREDUCE"] = alg  # each pyddl group reads it when created
        groups[alg] = dist.new_group(backend="pyddl")
    name = str(dtype).removeprefix("torch.")
    rows = []
    for nbytes in sizes:
        numel = max(n, nbytes // dtype.itemsize // n * n)
        x = torch.ones(numel, dtype=dtype)
        out = torch.empty(numel // n, dtype=dtype)
        for label, group in groups.items():
            rows.append(_row(f"ar/{label}", nbytes, name,
                             _measure(lambda: dist.all_reduce(x, group=group), iters, warmup), n, servers, link_gbps,
                             racks=racks, rack_gbps=rack_gbps))
        for label, group in groups.items():
            rows.append(_row(f"rs/{label}", nbytes, name,
                             _measure(lambda: dist.reduce_scatter_tensor(out, x, group=group), iters, warmup),
                             n, servers, link_gbps, half=True, racks=racks, rack_gbps=rack_gbps))
    for group in groups.values():
        dist.destroy_process_group(group)
    return rows


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_table(rows: list[dict]) -> str:
    """Render the rows as the aligned text table `pyddl bench allreduce` prints; rows marked
    unreliable get a `!` and a line below the table saying why."""
    head = (f"{'size':>6} {'algorithm':>10} {'tensor':>6} {'median ms':>10} {'cpu ms':>8} {'algbw Gb/s':>11} "
            f"{'busbw Gb/s':>11} {'bound ms':>9} {'bound/meas':>10} {'spread':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cpu = f"{r['cpu_s'] * 1e3:8.2f}" if r.get("cpu_s") is not None else f"{'-':>8}"
        bound = f"{r['bound_s'] * 1e3:9.2f}" if r["bound_s"] else f"{'-':>9}"
        ratio = f"{r['bound_ratio']:10.2f}" if r["bound_ratio"] else f"{'-':>10}"
        lines.append(
            f"{_fmt_bytes(r['bytes']):>6} {r['algorithm']:>10} {r.get('tensor', '-'):>6} {r['median_s'] * 1e3:10.2f} "
            f"{cpu} {r['algbw_gbps']:11.3f} {r['busbw_gbps']:11.3f} {bound} {ratio} {r['spread']:6.2f}"
            + (" !" if r["unreliable"] else "")
        )
    if any(r["unreliable"] for r in rows):
        lines.append(f"! unreliable: the samples' interquartile range is over {SPREAD_LIMIT:.0%} of their median, or "
                     "the row beats the physical bound; the machine was busy. Rerun on a quiet machine, or with "
                     "more --iters.")
    return "\n".join(lines)


def main(sizes: list[int], algorithms: list[str], iters: int, warmup: int, json_path: str | None, link_gbps: float | None,
         dtype: torch.dtype = torch.float32, api: str = "pyddl", tensors: list[str] = TENSORS,
         compression: str | None = None) -> None:
    """The body of `pyddl bench allreduce` inside each worker; rank 0 prints and writes."""
    pyddl.init()
    link = link_gbps or (float(os.environ[PYDDL_LINK_GBPS]) if os.environ.get(PYDDL_LINK_GBPS) else None)
    # Emulated racks (the launcher says how many, and their uplinks' rate): a bound per level.
    racks = int(os.environ.get(PYDDL_RACKS) or 1)
    rack_gbps = float(os.environ[PYDDL_RACK_GBPS]) if os.environ.get(PYDDL_RACK_GBPS) else None
    if api == "backend":
        rows = bench_backend(sizes, algorithms, iters, warmup, link, dtype, racks, rack_gbps)
    else:
        rows = bench_allreduce(sizes, algorithms, iters, warmup, link, dtype, tensors, racks, rack_gbps, compression)
    # How many ranks share this machine's cores (emulated servers all do): the simulator
    # scales its host costs by that load when it fits or predicts these rows.
    hosts: list = [None] * pyddl.size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    if pyddl.rank() == 0:
        topo = pyddl.topology()
        what = ("dist.all_reduce (ar) and dist.reduce_scatter_tensor (rs) on groups of backend pyddl and gloo, "
                if api == "backend" else "allreduce ")
        codec = rows[0].get("compression", "none") if rows else "none"
        wire = f" ({codec} on the wire)" if codec != "none" else ""
        print(f"{what}of {str(dtype).removeprefix('torch.')}{wire} over {pyddl.size()} ranks, topology {topo.spec} "
              f"({pyddl.cross_size()} servers), backend {torch.distributed.get_backend()}"
              + (f", link {link:g} Gbit/s" if link else "")
              + (f", {racks} racks, uplinks " + (f"{rack_gbps:g} Gbit/s" if rack_gbps else "unlimited")
                 if racks > 1 else ""))
        print(format_table(rows))
        if json_path:
            meta = {
                "world_size": pyddl.size(),
                "dims": list(topo.dims),
                "backend": torch.distributed.get_backend(),
                "emulate": ({"nodes": pyddl.cross_size(), "link_gbps": link, "racks": racks, "rack_gbps": rack_gbps}
                            if link or racks > 1 else None),
                "chunk_bytes": pyddl.settings().chunk_bytes,
                "host": {"cpus": os.cpu_count() or 1, "ranks": hosts.count(hosts[0])},
                "torch": torch.__version__.split("+")[0],
            }
            with open(json_path, "w") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=1)
            print(f"wrote {json_path}")
    pyddl.shutdown()
