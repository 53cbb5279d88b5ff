"""Training-step benchmark: one model under one worker, torch DDP and pyddl, side by side.

`pyddl bench step --model resnet18 -np 2` first times the model alone on one worker, then
starts N workers that time, in turn, DDP (Gloo/NCCL allreduce, fp16 hook, noop hook) and
pyddl's DistributedOptimizer (each algorithm, with and without fp16 on the wire, and with
no communication); the bf16 wire of both (`ddp-bf16`, `pyddl-native-bf16`) and pyddl's
compressed wires with its cross-rank check off (`-nocheck`) when named. Same
model, seed and synthetic batch everywhere; data loading is left out.

The systems are interleaved step by step: every system is built once, and each pass of a round
times one step of each in turn, so a change in the machine's speed during the run (a shared or
virtual machine drifts by 5-10% within a minute) falls on every system alike instead of on
whichever ran last.

Figures per system: the median step time (each step timed from a barrier to the slowest
rank's end, as a synchronous job runs), images/s, the communication
efficiency = (its own family's no-communication step time) / (its step time), whose
complement is the exposed-communication fraction (with several rounds: the median over rounds
of that ratio within each round); "vs plain", the same ratio against one baseline for every
family, the bare model and optimizer (the pyddl-noop run); and the scaling efficiency against
the one worker alone = throughput(n) / (n x throughput(1)). Also the CPU time per step of the
slowest rank's process and, against the no-communication run, the CPU that communication
costs ("comm cpu") and the communication efficiency that CPU alone allows where it shares the
cores with compute ("cpu ceiling" = no-communication step / (that step + k x comm cpu), where k
is the number of ranks per core on the most crowded machine, at least 1: ranks that share a
core wait for each other's communication CPU as well as their own).
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import math
import os
import random
import statistics
import threading
import time

import torch
import torch.nn as nn

from pyddl.bench.systems import NOCHECK, ON_PYDDL, TORCH_SYSTEMS, torch_default_systems

__all__ = ["SYSTEMS", "run_systems", "summarize", "judge", "format_table", "format_exposed", "format_threads",
           "exposed_ratio_interval", "thread_cpu_s", "ranks_per_core", "job_ranks_per_core", "cpu_ceiling",
           "default_systems", "plot"]

SYSTEMS = TORCH_SYSTEMS
default_systems = torch_default_systems


def _family(system: str) -> str:
    return "ddp" if system.startswith("ddp") else "pyddl"


def _build(system: str, model_name: str, num_classes: int, image_size: int, bucket_mb: float):
    from pyddl.train.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, num_classes, (3, image_size, image_size))
    sgd = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)  # noqa: E731
    if system in ("single", "pyddl-noop"):
        return model, model, sgd(model.parameters())
    if system == "ddp-on-pyddl":
        ddp = nn.parallel.DistributedDataParallel(model, process_group=_pyddl_group(),
                                                  **({"bucket_cap_mb": bucket_mb} if bucket_mb else {}))
        return model, ddp, sgd(ddp.parameters())
    if system.startswith("fsdp2"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        group = _pyddl_group() if system.endswith(ON_PYDDL) else dist.group.WORLD
        mesh = DeviceMesh.from_group(group, "cpu")
        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model, sgd(model.parameters())
    if system.startswith("ddp"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        from pyddl.torch.ddp_hook import noop_hook

        ddp = nn.parallel.DistributedDataParallel(model, **({"bucket_cap_mb": bucket_mb} if bucket_mb else {}))
        if system == "ddp-fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif system == "ddp-bf16":
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif system == "ddp-noop":
            ddp.register_comm_hook(None, noop_hook)
        return model, ddp, sgd(ddp.parameters())
    from pyddl.torch.optimizer import DistributedOptimizer

    parts = system.removesuffix(NOCHECK).split("-")
    codec = type("Codec", (), {"codec": parts[-1] if parts[-1] in ("fp16", "bf16") else "none"})()
    sizing = {"bucket_bytes": int(bucket_mb * 1024 * 1024)} if bucket_mb else {}
    opt = DistributedOptimizer(
        sgd(model.parameters()), named_parameters=model.named_parameters(), compression=codec,
        algorithm=parts[1], **sizing,
    )
    return model, model, opt


def _pyddl_group():
    """A group of backend pyddl over every rank, on the multiring (collective: every rank)."""
    import os

    import torch.distributed as dist

    import pyddl.torch  # noqa: F401  (registers backend "pyddl")

    before = os.environ.get("PYDDL_ALLREDUCE")
    os.environ["PYDDL_ALLREDUCE"] = "multiring"  # read when the group is created
    try:
        return dist.new_group(backend="pyddl")
    finally:
        if before is None:
            del os.environ["PYDDL_ALLREDUCE"]
        else:
            os.environ["PYDDL_ALLREDUCE"] = before


def ranks_per_core(placements: list[tuple[object, frozenset[int]]]) -> float:
    """How many ranks share each core where the job is most crowded: per machine, its ranks
    over the cores they may run on together (at least 1), the largest over the machines.

    `placements` has one (machine, CPUs the rank may run on) per rank. Where ranks outnumber
    cores and compute keeps each core busy, every CPU-second a rank spends on communication
    delays the step by this many seconds: the others on its core wait for it too.
    """
    ranks: dict[object, int] = collections.Counter(machine for machine, _ in placements)
    cores: dict[object, set[int]] = collections.defaultdict(set)
    for machine, cpus in placements:
        cores[machine] |= cpus
    return max(max(1.0, ranks[m] / max(1, len(cores[m]))) for m in ranks)


def _machine_key() -> int:
    # Ranks in the emulated cluster's network namespaces share the kernel, and with it its
    # boot id: one machine, however many servers it plays.
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            ident = fh.read().strip()
    except OSError:
        import socket

        ident = socket.gethostname().encode()
    return int.from_bytes(hashlib.sha256(ident).digest()[:8], "little", signed=True)


def job_ranks_per_core() -> float:
    """`ranks_per_core` of the running job (collective: every rank calls it, after pyddl.init)."""
    import pyddl

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    heads = pyddl.allgather(torch.tensor([[_machine_key(), len(cpus)]], dtype=torch.int64)).tolist()
    flat = pyddl.allgather(torch.tensor(cpus, dtype=torch.int64)).tolist()
    placements, at = [], 0
    for machine, count in heads:
        placements.append((machine, frozenset(flat[at : at + count])))
        at += count
    return ranks_per_core(placements)


def cpu_ceiling(noop_step_s: float, comm_cpu_s: float, per_core: float = 1.0) -> float:
    """The communication efficiency that communication's CPU alone allows where compute keeps
    every core busy: the step is at least the no-communication step plus that CPU, counted once
    per rank sharing the core (`per_core`, from `ranks_per_core`)."""
    return noop_step_s / (noop_step_s + per_core * max(0.0, comm_cpu_s))


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each live thread of this process has used, by name: the
    Python name where the thread is Python's (MainThread, pyddl-engine), else the kernel's
    (gloo_tcp_loop, pt_gloo_runloop). Empty where /proc is not available."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = collections.Counter()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                stat = fh.read()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = names.get(int(tid)) or stat[stat.index("(") + 1: stat.rindex(")")]
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


class _Runner:
    """One system, built once: its model, forward and optimizer on one fixed synthetic batch."""

    def __init__(self, system: str, model_name: str, batch: int, image_size: int, bucket_mb: float):
        num_classes = 1000
        self.check = not system.endswith(NOCHECK)  # pyddl's cross-rank check during its steps
        self.model, self.forward, self.opt = _build(system, model_name, num_classes, image_size, bucket_mb)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, image_size, image_size, generator=g)
        self.y = torch.randint(0, num_classes, (batch,), generator=g)
        self.loss_fn = nn.CrossEntropyLoss()

    def step(self) -> tuple[float, float]:
        """One training step; return its wall time and this process's CPU time (every thread:
        compute, the backend's threads, the kernel's work charged to them)."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad()
        self.loss_fn(self.forward(self.x), self.y).backward()
        self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def run_systems(systems: list[str], model_name: str, batch: int, image_size: int, steps: int, warmup: int,
                bucket_mb: float, rounds: int = 1) -> tuple[int, list[dict]]:
    """Inside a job: time each system on every rank; return (rank, rows), each row holding the
    median over all its timed steps of the slowest rank's time in that step, and the median of
    each round.

    Every system is built once and warmed up; then each round makes `steps` passes, and each
    pass times one step of every system, starting one system further each pass. A system's
    steps are thus spread over the round like everyone else's, so the machine's drift (seconds
    to minutes) falls on all systems alike and cancels in the per-round ratios.

    Every timed step starts at a barrier, and a step's time is its slowest rank's: what a
    synchronous job would take. Without communication the ranks never wait for each other, and
    on a shared machine their step times scatter independently (by 100-300 ms per ResNet-18
    step on the emulated bed): a system that synchronizes pays the slower rank every step, a
    free network included. Timing each rank's own median instead would charge that to the
    network, and a step that follows a no-communication one would inherit the ranks' drift.
    """
    import pyddl

    pyddl.init()
    rank = pyddl.rank()
    per_core = job_ranks_per_core()
    job_check = pyddl.settings().check  # PYDDL_CHECK; the -nocheck systems turn it off for their steps
    runners = {s: _Runner(s, model_name, batch, image_size, bucket_mb) for s in systems}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    times: dict[str, list[float]] = {s: [] for s in systems}  # the slowest rank's, per step
    mine: dict[str, list[float]] = {s: [] for s in systems}  # this rank's
    cpu: dict[str, list[float]] = {s: [] for s in systems}
    by_thread: dict[str, dict[str, float]] = {s: {} for s in systems}  # this rank's, summed
    per_round: dict[str, list[float]] = {s: [] for s in systems}
    passes = 0
    for r in range(rounds):
        this_round = torch.zeros(len(systems), steps, dtype=torch.float64)
        for step in range(steps):
            first = passes % len(systems)
            for k in range(len(systems)):
                i = (first + k) % len(systems)
                system = systems[i]
                check = job_check and runners[system].check
                if pyddl.settings().check != check:
                    pyddl.set_check(check)
                pyddl.barrier()
                before = thread_cpu_s()
                wall, used = runners[system].step()
                for name, spent in thread_cpu_s().items():
                    by_thread[system][name] = by_thread[system].get(name, 0.0) + spent - before.get(name, 0.0)
                this_round[i, step] = wall
                mine[system].append(wall)
                cpu[system].append(used)
            passes += 1
        worst = pyddl.allreduce(this_round, op="max")  # the slowest rank sets each step's pace
        for system, walls in zip(systems, worst.tolist()):
            med = statistics.median(walls)
            times[system].extend(walls)
            per_round[system].append(med)
            if rank == 0:
                print(f"  round {r + 1}/{rounds}  {system:<26} {med * 1e3:8.1f} ms/step", flush=True)
    worst_cpu = pyddl.allreduce(torch.tensor([statistics.median(cpu[s]) for s in systems], dtype=torch.float64),
                                op="max").tolist()
    rows = []
    for system, cpu_s in zip(systems, worst_cpu):
        step_s = statistics.median(times[system])
        rows.append({"system": system, "workers": pyddl.size(), "batch_per_worker": batch,
                     "median_step_s": step_s, "images_per_s": pyddl.size() * batch / step_s,
                     "cpu_s_per_step": cpu_s, "ranks_per_core": per_core, "round_medians_s": per_round[system],
                     "rank0_thread_cpu_s_per_step": {k: v / len(mine[system]) for k, v in by_thread[system].items()},
                     "rank0_mean_step_s": statistics.fmean(mine[system]),
                     "step_times_s": times[system]})
    # DDP's reducers must go while their process group is alive: destroyed after it, at
    # interpreter exit, they abort the process.
    runners.clear()
    gc.collect()
    pyddl.shutdown()
    return rank, rows


def summarize(rows: list[dict]) -> list[dict]:
    """Add communication and scaling efficiencies to the rows (the bench's derived figures)."""
    by = {(r["system"], r["workers"]): r for r in rows}
    single = next((r for r in rows if r["system"] == "single"), None)
    out = []
    for r in rows:
        r = dict(r)
        noop = by.get((f"{_family(r['system'])}-noop", r["workers"]))
        if r["system"] != "single" and noop is not None:
            r["comm_efficiency"], by_round = _ratio(noop, r)
            if by_round:
                r["comm_efficiency_by_round"] = by_round
            r["exposed_comm_fraction"] = 1 - r["comm_efficiency"]
            if "cpu_s_per_step" in r and "cpu_s_per_step" in noop:
                # The CPU that communication itself burns in this process (packing, the
                # backend's threads, the kernel's TCP work charged to them). Where it shares
                # the cores with compute, as on the emulated bed, the step cannot be shorter
                # than compute + this (once per rank sharing a core), whatever the overlap:
                # the efficiency's ceiling.
                r["comm_cpu_s"] = r["cpu_s_per_step"] - noop["cpu_s_per_step"]
                r["cpu_bound_comm_efficiency"] = cpu_ceiling(noop["median_step_s"], r["comm_cpu_s"],
                                                             r.get("ranks_per_core", 1.0))
        plain = by.get(("pyddl-noop", r["workers"]))
        if r["system"] != "single" and plain is not None:
            # Against the bare model and optimizer, the same for every family: DDP's own
            # no-communication run still pays its reducer's bucket copies (about 5% of a
            # ResNet-18 step on the emulated bed), which its comm efficiency leaves out.
            r["plain_efficiency"] = _ratio(plain, r)[0]
            if not r["system"].endswith("noop"):
                r["exposed_s"] = _difference(plain, r)
        if single is not None:
            r["scaling_efficiency"] = r["images_per_s"] / (r["workers"] * single["images_per_s"])
        out.append(r)
    by = {(r["system"], r["workers"]): r for r in out}
    for r in out:
        peer = by.get((_ddp_peer(r["system"]), r["workers"]))
        if (not _is_ddp_peer(r["system"]) and peer is not None and "exposed_s" in r
                and peer.get("exposed_s", 0.0) > 0):
            r["exposed_vs_ddp"] = r["exposed_s"] / peer["exposed_s"]
            plain = by[("pyddl-noop", r["workers"])]
            if _paired(plain, peer, r):
                lo, hi = exposed_ratio_interval(*(x["step_times_s"] for x in (plain, peer, r)))
                r["exposed_vs_ddp_ci"] = (lo, hi if math.isfinite(hi) else None)  # None: unbounded (JSON has no inf)
    return out


def _is_ddp_peer(system: str) -> bool:
    """DDP's own rows (its family, on its own backend): the peers the others are held to."""
    return _family(system) == "ddp" and not system.endswith(ON_PYDDL)


def _ddp_peer(system: str) -> str:
    """DDP at the same wire precision: what a system's exposed communication is held to
    (`pyddl-native-bf16-nocheck` against `ddp-bf16`)."""
    for wire in ("fp16", "bf16"):
        if f"-{wire}" in system:
            return f"ddp-{wire}"
    return "ddp"


def _paired(*rows: dict) -> bool:
    """Whether the rows' steps pair up pass by pass: one run times one step of every system in
    each pass, so the i-th step of each row ran within seconds of the others'."""
    counts = {len(r.get("step_times_s", [])) for r in rows}
    return len(counts) == 1 and counts.pop() > 1


def _difference(base: dict, row: dict) -> float:
    """row step - base step: the median over passes of the two steps' difference in each pass
    (the machine's drift, minutes and seconds, cancels out); else the difference of the medians."""
    if _paired(base, row):
        return statistics.median(m - t for m, t in zip(row["step_times_s"], base["step_times_s"]))
    return row["median_step_s"] - base["median_step_s"]


# How sure the bench is of an exposed-communication ratio: a bootstrap over passes, this many
# resamples, this two-sided confidence, from a fixed seed (the same figures every time).
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.90


def exposed_ratio_interval(plain: list[float], peer: list[float], row: list[float]) -> tuple[float, float]:
    """The bootstrap interval (CONFIDENCE, two-sided) of median(row - plain) / median(peer - plain)
    over passes.

    Each pass is one paired observation (one step of every system within seconds), so passes
    are resampled whole, with replacement. A resample in which the peer exposed nothing makes
    the ratio unbounded; the upper end is then infinite."""
    n = len(plain)
    mine = [m - p for m, p in zip(row, plain)]
    theirs = [d - p for d, p in zip(peer, plain)]
    rng = random.Random(0)
    ratios = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picks = [rng.randrange(n) for _ in range(n)]
        denominator = statistics.median(theirs[i] for i in picks)
        ratios.append(statistics.median(mine[i] for i in picks) / denominator if denominator > 0 else math.inf)
    ratios.sort()
    tail = (1 - CONFIDENCE) / 2
    return ratios[int(tail * BOOTSTRAP_RESAMPLES)], ratios[int((1 - tail) * BOOTSTRAP_RESAMPLES) - 1]


# A row is not a result when its rounds disagree by more than this fraction of their median
# (the machine's load moved between rounds), or when an efficiency is above 1 by more than
# the slack: no system runs faster than its own no-communication or one-worker baseline.
ROUND_SPREAD_LIMIT = 0.15
EFFICIENCY_SLACK = 0.02
# An exposed-communication ratio against DDP is a difference over a difference of steps, so it
# is far less certain than either step: one whose 90% interval is wider than this fraction of
# its value (0.67x known no better than 0.5x-0.84x), or unbounded, is marked as not a result.
EXPOSED_INTERVAL_LIMIT = 0.5


def judge(rows: list[dict]) -> list[dict]:
    """Give each summarized row `unreliable`: the reasons not to read it as a result (empty
    when there are none). A scaling efficiency rests on the one-worker row too."""
    single = next((r for r in rows if r["system"] == "single"), None)
    single_disagrees = single is not None and _round_spread(single) > ROUND_SPREAD_LIMIT
    out = []
    for r in rows:
        reasons = []
        spread = _round_spread(r)
        if spread > ROUND_SPREAD_LIMIT:
            reasons.append(f"its rounds disagree by {spread:.0%}")
        for key in ("comm_efficiency", "plain_efficiency", "scaling_efficiency"):
            if r.get(key, 0.0) > 1 + EFFICIENCY_SLACK:
                reasons.append(f"{key.replace('_', ' ')} {r[key]:.2f} is above 1")
        if r is not single and "scaling_efficiency" in r and single_disagrees:
            reasons.append("the one-worker row it scales against is unreliable")
        judged = {**r, "unreliable": reasons}
        if "exposed_vs_ddp_ci" in r:
            lo, hi = r["exposed_vs_ddp_ci"]
            if hi is None or hi - lo > EXPOSED_INTERVAL_LIMIT * abs(r["exposed_vs_ddp"]):
                judged["exposed_vs_ddp_unreliable"] = f"{CONFIDENCE:.0%} interval {_interval(lo, hi)}"
        out.append(judged)
    return out


def _round_spread(row: dict) -> float:
    """(slowest - fastest round median) / their median; 0 for fewer than two rounds."""
    rounds = row.get("round_medians_s", [])
    return (max(rounds) - min(rounds)) / statistics.median(rounds) if len(rounds) > 1 else 0.0


def _ratio(base: dict, row: dict) -> tuple[float, list[float]]:
    """base step / row step: the median of the per-round ratios when both ran the same rounds
    (the machine's drift between rounds cancels out), else the ratio of the medians."""
    mine, theirs = row.get("round_medians_s", []), base.get("round_medians_s", [])
    if len(mine) > 1 and len(mine) == len(theirs):
        by_round = [n / m for n, m in zip(theirs, mine)]
        return statistics.median(by_round), by_round
    return base["median_step_s"] / row["median_step_s"], []


def format_table(rows: list[dict]) -> str:
    head = (f"{'system':<26} {'workers':>7} {'step ms':>8} {'images/s':>9} {'comm eff':>9} {'vs plain':>8} {'exposed':>8} "
            f"{'scaling eff':>11} {'comm cpu ms':>11} {'cpu ceiling':>11}  {'round medians ms':<16}")
    lines = [head, "-" * len(head)]

    def cell(r, key, width, fmt):
        return f"{format(r[key], fmt):>{width}}" if key in r else f"{'-':>{width}}"

    for r in rows:
        comm_cpu = {"comm_cpu_ms": r["comm_cpu_s"] * 1e3} if "comm_cpu_s" in r else {}
        spread = "/".join(f"{m * 1e3:.0f}" for m in r.get("round_medians_s", []))
        lines.append(f"{r['system']:<26} {r['workers']:>7} {r['median_step_s'] * 1e3:8.1f} {r['images_per_s']:9.1f} "
                     f"{cell(r, 'comm_efficiency', 9, '.3f')} {cell(r, 'plain_efficiency', 8, '.3f')} "
                     f"{cell(r, 'exposed_comm_fraction', 8, '.3f')} "
                     f"{cell(r, 'scaling_efficiency', 11, '.3f')} {cell(comm_cpu, 'comm_cpu_ms', 11, '.1f')} "
                     f"{cell(r, 'cpu_bound_comm_efficiency', 11, '.3f')}  {spread}"
                     + (" !" if r.get("unreliable") else ""))
    crowded = max((r.get("ranks_per_core", 1.0) for r in rows if "cpu_bound_comm_efficiency" in r), default=1.0)
    if crowded > 1:
        lines.append(f"cpu ceiling counts communication's CPU {crowded:g} times: {crowded:g} ranks share each core "
                     "of the most crowded machine, and wait for each other's communication")
    flagged = [r for r in rows if r.get("unreliable")]
    if flagged:
        lines.append("! unreliable, not a result (the machine was busy; rerun on a quiet one, or with more --rounds):")
        lines += [f"!   {r['system']} x{r['workers']}: {'; '.join(r['unreliable'])}" for r in flagged]
    return "\n".join(lines)


def format_exposed(rows: list[dict]) -> str:
    """Each system's exposed communication (its step minus the bare model's, pyddl-noop) and,
    for pyddl's, the ratio to DDP's at the same wire precision. Empty without pyddl-noop."""
    shown = [r for r in rows if "exposed_s" in r]
    if not shown:
        return ""
    lines = ["exposed communication (step - pyddl-noop step in the same pass, median over passes), against "
             f"DDP's at the same wire precision, with its {CONFIDENCE:.0%} interval:"]
    for r in shown:
        versus = (f"  {r['exposed_vs_ddp']:.2f}x {_ddp_peer(r['system'])}'s" if "exposed_vs_ddp" in r else "")
        if "exposed_vs_ddp_ci" in r:
            versus += f" ({_interval(*r['exposed_vs_ddp_ci'])})"
        # A ratio's interval already holds the scatter of its passes; paired pass by pass, it
        # does not move with the drift that makes a row's rounds disagree.
        flagged = r.get("exposed_vs_ddp_unreliable") if "exposed_vs_ddp_ci" in r else r.get("unreliable")
        lines.append(f"  {r['system']:<26} x{r['workers']:<3} {r['exposed_s'] * 1e3:7.0f} ms{versus}"
                     + (" !" if flagged else ""))
    wide = [r for r in shown if r.get("exposed_vs_ddp_unreliable")]
    if wide:
        lines.append(f"! not a result: a ratio whose {CONFIDENCE:.0%} interval is wider than "
                     f"{EXPOSED_INTERVAL_LIMIT:.0%} of it (rerun with more --rounds, on a quieter machine):")
        lines += [f"!   {r['system']} x{r['workers']}: {r['exposed_vs_ddp_unreliable']}" for r in wide]
    return "\n".join(lines)


def _interval(lo: float, hi: float | None) -> str:
    return f"{lo:.2f}-unbounded" if hi is None else f"{lo:.2f}-{hi:.2f}"


def format_threads(rows: list[dict]) -> str:
    """Rank 0's CPU per step by thread, per system, with the idle rest (rank 0's mean step -
    its CPU): where the time of a step goes when every core is busy. Means, not medians, so
    that the parts add up. Empty when no row has the breakdown."""
    lines = []
    for r in rows:
        threads = r.get("rank0_thread_cpu_s_per_step")
        if not threads:
            continue
        busy = sorted(((v, k) for k, v in threads.items() if v >= 0.0005), reverse=True)
        idle = r.get("rank0_mean_step_s", r["median_step_s"]) - sum(threads.values())
        cells = "  ".join(f"{name} {v * 1e3:.0f}" for v, name in busy)
        lines.append(f"{r['system']:<26} {cells}  | idle {idle * 1e3:.0f}")
    if not lines:
        return ""
    return "CPU ms per step by thread (rank 0, means), and the rest of its step spent waiting:\n" + "\n".join(lines)


def worker_main(out_path: str, systems: list[str], model_name: str, batch: int, image_size: int, steps: int,
                warmup: int, bucket_mb: float, rounds: int = 1) -> None:
    """The body run by each worker of a step-bench job; rank 0 writes the rows to out_path."""
    rank, rows = run_systems(systems, model_name, batch, image_size, steps, warmup, bucket_mb, rounds)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Write a PNG: scaling efficiency and communication efficiency against worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = [s for s in dict.fromkeys(r["system"] for r in rows) if s != "single"]
    for system in systems:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["workers"])
        xs = [1] + [r["workers"] for r in mine]
        style = "--" if system.endswith("noop") else "-"
        left.plot(xs, [1.0] + [r.get("scaling_efficiency", float("nan")) for r in mine], style, marker="o", label=system)
        if not system.endswith("noop"):
            right.plot([r["workers"] for r in mine], [r.get("comm_efficiency", float("nan")) for r in mine],
                       marker="o", label=system)
    top = max([1.0] + [r.get(k, 0.0) for r in rows for k in ("scaling_efficiency", "comm_efficiency")]) * 1.05
    left.set(xlabel="workers", ylabel="throughput(n) / (n x throughput(1))", title="scaling efficiency", ylim=(0, top))
    right.set(xlabel="workers", ylabel="no-communication step / step", title="communication efficiency", ylim=(0, top))
    counts = sorted({1} | {r["workers"] for r in rows})
    for ax in (left, right):
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
