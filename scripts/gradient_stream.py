"""A training step's gradients, all at once: how busy each bucket size keeps the link, and the CPU it costs.

    pyddl run -np 4 --emulate-nodes 2 --emulate-link-gbps 0.5 scripts/gradient_stream.py
    pyddl run -np 4 --emulate-nodes 2 --emulate-link-gbps 0.5 scripts/gradient_stream.py \\
        --configs multiring:2,multiring:25,native:25 --rounds 5

Each config cuts ResNet-18's 46.8 MB of fp32 gradients (`--params`) into buckets of its size,
allocates them fresh, submits every bucket with `pyddl.allreduce_async_` (as
DistributedOptimizer does when backward outruns the network) and waits for all. Configs run in
turn within each round, so the machine's drift falls on all alike. Rank 0 prints, per config,
the median time against the link bound (`--link-gbps`; servers from the job's topology), the
process CPU time the stream took on rank 0 (every thread: pyddl's engine and stages, Gloo's,
the kernel's TCP work charged to them), its sum over all ranks, and rank 0's split by thread;
a config whose rounds disagree by more than `pyddl bench step` accepts (ROUND_SPREAD_LIMIT) is
marked. A config is ALGORITHM:BUCKET_MIB[:nocheck][:views]; with `views` the buckets are views
of one tensor, back to back as DistributedOptimizer lays out its buckets' wire buffers, so that
a shared pass cuts them into chunks as one buffer.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

import pyddl
from pyddl.bench.allreduce import bound_s
from pyddl.bench.step import ROUND_SPREAD_LIMIT, thread_cpu_s


def _config(text: str) -> tuple[str, float, bool, bool]:
    parts = text.split(":")
    flags = parts[2:]
    if len(parts) < 2 or not set(flags) <= {"nocheck", "views"} or len(set(flags)) < len(flags):
        raise argparse.ArgumentTypeError(f"a config is ALGORITHM:BUCKET_MIB[:nocheck][:views], got {text!r}")
    try:
        mib = float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bucket size must be a number of MiB, got {parts[1]!r}") from None
    if mib <= 0:
        raise argparse.ArgumentTypeError(f"bucket size must be > 0 MiB, got {parts[1]!r}")
    return parts[0], mib, "nocheck" not in flags, "views" in flags


def _buckets(params: int, mib: float) -> list[int]:
    per = max(1, int(mib * 2**20) // 4)
    return [min(per, params - start) for start in range(0, params, per)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=lambda s: [_config(c) for c in s.split(",")],
                    default="multiring:2,multiring:2:nocheck,multiring:25,native:25,native:2",
                    help="comma-separated ALGORITHM:BUCKET_MIB[:nocheck][:views] (default: %(default)s)")
    ap.add_argument("--params", type=int, default=11_689_512, help="fp32 gradients (default: ResNet-18's)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, after one untimed (default 3)")
    ap.add_argument("--link-gbps", type=float, default=0.5, help="each server's link, for the bound (default 0.5)")
    args = ap.parse_args()
    if args.rounds < 1 or args.params < 1 or args.link_gbps <= 0:
        ap.error("--rounds and --params must be >= 1 and --link-gbps > 0")

    pyddl.init()
    times = {c: [] for c in args.configs}
    cpu = {c: [] for c in args.configs}
    threads = {c: collections.Counter() for c in args.configs}
    for r in range(args.rounds + 1):
        for cfg in args.configs:
            alg, mib, check, views = cfg
            pyddl.set_check(check)
            sizes = _buckets(args.params, mib)
            if views:
                tensors = list(torch.full((args.params,), 1.0).split(sizes))
            else:
                tensors = [torch.full((n,), 1.0) for n in sizes]
            pyddl.barrier()
            before = thread_cpu_s()
            c0, t0 = time.process_time(), time.perf_counter()
            for handle in [pyddl.allreduce_async_(t, algorithm=alg) for t in tensors]:
                handle.wait()
            wall, spent = time.perf_counter() - t0, time.process_time() - c0
            after = thread_cpu_s()
            pyddl.set_check(True)
            if not all(bool((t == pyddl.size()).all()) for t in tensors):
                raise SystemExit(f"gradient_stream: {alg} returned a wrong sum")
            if r:
                times[cfg].append(wall)
                cpu[cfg].append(spent)
                for name, s in after.items():
                    threads[cfg][name] += (s - before.get(name, 0.0)) / args.rounds
    # Ranks of a flat ring do unequal work (on 2 servers x 2 only two of them send across the
    # servers), so every rank's median CPU is summed as well as rank 0's shown.
    medians = torch.tensor([statistics.median(cpu[c]) for c in args.configs], dtype=torch.float64)
    all_ranks = dict(zip(args.configs, pyddl.allreduce(medians, op="sum").tolist()))
    if pyddl.rank() != 0:
        return
    servers = pyddl.cross_size()
    nbytes = 4 * args.params
    bound = bound_s(nbytes, servers, args.link_gbps)
    ranks = pyddl.size()
    flat = (ranks - 1) / ranks * servers / (servers - 1) if servers > 1 else 1.0
    print(f"{nbytes / 1e6:.1f} MB of gradients over {servers} servers at {args.link_gbps:g} Gbit/s: "
          f"link bound {bound * 1e3:.0f} ms (a flat ring of {ranks} ranks sends {flat:.2f}x that through a link)")
    print(f"{'config':<24} {'median ms':>9} {'bound/time':>10} {'cpu ms':>7} {'all ranks':>9}  "
          "rounds ms; rank 0's cpu by thread ms")
    for cfg in args.configs:
        alg, mib, check, views = cfg
        med = statistics.median(times[cfg])
        spread = (max(times[cfg]) - min(times[cfg])) / med
        flag = f" ! rounds disagree by {spread:.0%}" if spread > ROUND_SPREAD_LIMIT else ""
        split = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in threads[cfg].most_common(4) if v >= 0.0005)
        name = f"{alg} {mib:g} MiB" + ("" if check else " nocheck") + (" views" if views else "")
        ratio = f"{bound / med:10.2f}" if bound else f"{'-':>10}"
        print(f"{name:<24} {med * 1e3:9.0f} {ratio} {statistics.median(cpu[cfg]) * 1e3:7.0f} "
              f"{all_ranks[cfg] * 1e3:9.0f}  {'/'.join(f'{t * 1e3:.0f}' for t in times[cfg])}; {split}{flag}")


if __name__ == "__main__":
    main()
