"""`pyddl bench allreduce --framework jax`: pyddl.jax against JAX's own cross-process allreduce.

    pyddl bench allreduce --framework jax -np 4 --topology 2x2
    pyddl bench allreduce --framework jax -np 4 --emulate-nodes 2 --emulate-link-gbps 1 --algorithms multiring

Both systems reduce the same pytree: ResNet-50's parameters (161 float32 arrays, 97.5 MiB).
pyddl.jax fuses it into one core allreduce per dtype (each --algorithms entry); JAX's own is a
`psum` over all processes' CPU devices in one jitted shard_map, after `jax.distributed` with its
Gloo CPU collectives. Each row gets the link bound T_min = 2(M-1)/M x S / B on M servers and
the ratio T_min / T_measured. The copy row times a 64 MiB pytree (16 x 4 MiB) through pyddl.jax
over the same tensors through the torch core (`pyddl.grouped_allreduce_`): what crossing
frameworks costs.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time

import numpy as np
import torch

import pyddl
from pyddl.bench.allreduce import bound_s
from pyddl.config import PYDDL_LINK_GBPS

__all__ = ["resnet50_shapes", "bench_jax", "format_table", "main"]

_COPY_LEAVES, _COPY_LEAF_ELEMS = 16, 1 << 20  # 16 x 4 MiB of float32 = 64 MiB


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50 (25,557,032 weights), in order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, cin, 1, 1), (4 * width,), (4 * width,)]
            cin = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def _coordinator() -> str:
    """Rank 0's address on the data path and a free port there, sent to every rank."""
    msg = torch.zeros(5, dtype=torch.int64)
    if pyddl.rank() == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the route to the job's master
            probe.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 9))
            ip = probe.getsockname()[0]
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        msg = torch.tensor([*map(int, ip.split(".")), port], dtype=torch.int64)
    msg = pyddl.broadcast(msg, 0).tolist()
    return f"{'.'.join(map(str, msg[:4]))}:{msg[4]}"


def _start_jax_distributed(address: str):
    """jax.distributed over this job's ranks, Gloo CPU collectives on GLOO_SOCKET_IFNAME if set."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        # Emulated servers share a host name that resolves to each namespace's own loopback:
        # JAX's default Gloo device would be unreachable. Bind it to the data-path interface
        # (through JAX's backend registry: jax.distributed has no public option for it).
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax

        def factory():
            collectives = _jax.make_gloo_tcp_collectives(distributed.global_state.client, interface=interface)
            return xla_bridge.make_cpu_client(collectives=collectives)

        xla_bridge.register_backend_factory("cpu", factory, priority=0, fail_quietly=False)
    jax.distributed.initialize(coordinator_address=address, num_processes=pyddl.size(), process_id=pyddl.rank())
    return jax


def _timed(fn, iters: int, warmup: int) -> tuple[float, float]:
    """(median, min) seconds of fn() over `iters` samples, each from a barrier, slowest rank's."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        pyddl.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    worst = pyddl.allreduce(torch.tensor([statistics.median(samples), min(samples)], dtype=torch.float64), op="max")
    return float(worst[0]), float(worst[1])


def _check(what: str, leaf, want: float) -> None:
    got = float(np.asarray(leaf).reshape(-1)[0])
    if got != want:
        raise RuntimeError(f"{what} returned {got}, want {want}: the benchmark's result is wrong")


def bench_jax(algorithms: list[str], iters: int, warmup: int, link_gbps: float | None) -> list[dict]:
    """Time every system on the ResNet-50 pytree, then the copy check; every rank returns the rows."""
    jax = _start_jax_distributed(_coordinator())
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import pyddl.jax as hvd

    n, me, servers = pyddl.size(), pyddl.rank(), pyddl.cross_size()
    total = n * (n + 1) / 2
    shapes = resnet50_shapes()
    tree = [jnp.full(s, me + 1.0, jnp.float32) for s in shapes]
    nbytes = 4 * sum(int(np.prod(s)) for s in shapes)
    rows = []

    def row(system, what, size, leaves, times):
        r = {"system": system, "tree": what, "bytes": size, "leaves": leaves, "median_s": times[0], "min_s": times[1],
             "bound_s": None, "bound_ratio": None}
        if link_gbps and servers > 1:
            r["bound_s"] = bound_s(size, servers, link_gbps)
            r["bound_ratio"] = r["bound_s"] / times[0]
        rows.append(r)

    for alg in algorithms:
        _check(f"pyddl.jax {alg}", hvd.allreduce(tree, op=hvd.Sum, algorithm=alg)[0], total)
        times = _timed(lambda: jax.block_until_ready(hvd.allreduce(tree, op=hvd.Sum, algorithm=alg)), iters, warmup)
        row(f"pyddl.jax {alg}", "resnet50", nbytes, len(shapes), times)

    mesh = Mesh(np.array(jax.devices()), ("p",))
    spread = NamedSharding(mesh, P("p"))
    local = jax.local_devices()[0]
    global_tree = [jax.make_array_from_single_device_arrays((n,) + x.shape, spread, [jax.device_put(x[None], local)])
                   for x in tree]
    psum = jax.jit(jax.shard_map(lambda t: jax.tree.map(lambda a: jax.lax.psum(a, "p"), t), mesh=mesh,
                                 in_specs=P("p"), out_specs=P()))
    _check("jax psum", psum(global_tree)[0].addressable_shards[0].data, total)
    times = _timed(lambda: jax.block_until_ready(psum(global_tree)), iters, warmup)
    row("jax psum (gloo)", "resnet50", nbytes, len(shapes), times)

    # Crossing frameworks: the same 64 MiB pytree through pyddl.jax and through the torch core.
    alg = algorithms[0]
    jtree = [jnp.full((_COPY_LEAF_ELEMS,), me + 1.0, jnp.float32) for _ in range(_COPY_LEAVES)]
    ttree = [torch.full((_COPY_LEAF_ELEMS,), me + 1.0) for _ in range(_COPY_LEAVES)]
    size = 4 * _COPY_LEAVES * _COPY_LEAF_ELEMS
    row(f"pyddl.jax {alg}", "64M x16", size, _COPY_LEAVES,
        _timed(lambda: jax.block_until_ready(hvd.allreduce(jtree, op=hvd.Sum, algorithm=alg)), iters, warmup))
    row(f"torch core {alg}", "64M x16", size, _COPY_LEAVES,
        _timed(lambda: pyddl.grouped_allreduce_(ttree, op="sum", algorithm=alg), iters, warmup))
    jax.distributed.shutdown()
    return rows


def format_table(rows: list[dict]) -> str:
    """The aligned table `pyddl bench allreduce --framework jax` prints, and the copy overhead."""
    head = f"{'system':>22} {'pytree':>9} {'MiB':>6} {'leaves':>6} {'median ms':>10} {'bound ms':>9} {'bound/meas':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        bound = f"{r['bound_s'] * 1e3:9.1f}" if r["bound_s"] else f"{'-':>9}"
        ratio = f"{r['bound_ratio']:10.3f}" if r["bound_ratio"] else f"{'-':>10}"
        lines.append(f"{r['system']:>22} {r['tree']:>9} {r['bytes'] / 2**20:6.1f} {r['leaves']:6d} "
                     f"{r['median_s'] * 1e3:10.1f} {bound} {ratio}")
    copy = [r for r in rows if r["tree"] == "64M x16"]
    if len(copy) == 2:
        lines.append(f"copy overhead: the 64 MiB pytree through pyddl.jax takes {copy[0]['median_s'] / copy[1]['median_s']:.3f}x "
                     f"its time through the torch core")
    return "\n".join(lines)


def main(algorithms: list[str], iters: int, warmup: int, json_path: str | None, link_gbps: float | None) -> None:
    """The body of `pyddl bench allreduce --framework jax` inside each worker; rank 0 prints."""
    pyddl.init()
    link = link_gbps or (float(os.environ[PYDDL_LINK_GBPS]) if os.environ.get(PYDDL_LINK_GBPS) else None)
    rows = bench_jax(algorithms, iters, warmup, link)
    if pyddl.rank() == 0:
        print(f"allreduce of a pytree over {pyddl.size()} ranks, topology {pyddl.topology().spec} "
              f"({pyddl.cross_size()} servers)" + (f", link {link:g} Gbit/s" if link else ""))
        print(format_table(rows))
        if json_path:
            with open(json_path, "w") as fh:
                json.dump({"world_size": pyddl.size(), "servers": pyddl.cross_size(), "link_gbps": link,
                           "rows": rows}, fh, indent=1)
            print(f"wrote {json_path}")
    pyddl.shutdown()
