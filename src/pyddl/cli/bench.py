"""`pyddl bench`: measure collectives and training steps.

`pyddl bench allreduce -np 4` launches itself on 4 local workers; inside a job started by
`pyddl run` (or torchrun, srun, mpirun) it runs on that job's ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyddl.cli.run import add_job_flags, config_from_args, scheduler_mode
from pyddl.config import CODECS
from pyddl.launch.config import LaunchError
from pyddl.launch.local import launch

__all__ = ["register"]


def _in_job() -> bool:
    # A rank of a job (pyddl run, torchrun, an srun task, an mpirun rank), not an sbatch script
    # or salloc shell: there SLURM_PROCID is 0 of the allocation's tasks, none of them started.
    return "RANK" in os.environ or scheduler_mode(os.environ) == "rank"


def _launched(what: str, body) -> int:
    """Run body(), which launches jobs; turn its errors into a message and an exit code."""
    try:
        body()
    except ValueError as err:
        print(f"pyddl {what}: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    return 0


def _relaunch(args, argv_tail: list[str]) -> int:
    """Start this same bench on args.nproc local workers."""
    command = (sys.executable, "-m", "pyddl.cli.main", "bench", *argv_tail)
    return _launched("bench", lambda: launch(config_from_args(args, command)))


# Where a bare output name (`--json bench.json`) goes: a folder git ignores, so that running
# the README's commands from the repository leaves the working tree clean.
_RESULTS_DIR = "runs"


def _under_runs(args) -> None:
    """Put bare --json / --plot file names under runs/; a name with a folder is kept as is."""
    for flag in ("json", "plot"):
        name = getattr(args, flag, None)
        if name and not os.path.dirname(name):
            os.makedirs(_RESULTS_DIR, exist_ok=True)
            setattr(args, flag, os.path.join(_RESULTS_DIR, name))


def _allreduce(args) -> int:
    from pyddl.bench import options
    from pyddl.config import ALGORITHM_CHOICES as ALGORITHMS

    _under_runs(args)

    try:  # before anything loads torch: a typo fails at once
        sizes = [options.parse_size(s) for s in args.sizes.split(",")]
        dtype = options.parse_dtype_name(args.dtype)
        tensors = options.parse_tensors(args.tensors) if args.tensors else list(options.TENSORS)
    except ValueError as err:
        print(f"pyddl bench allreduce: {err}", file=sys.stderr)
        return 2
    if args.compression not in (None, "none") and (args.api != "pyddl" or args.framework != "torch"):
        print("pyddl bench allreduce: --compression applies to pyddl.allreduce (--api pyddl, --framework torch)",
              file=sys.stderr)
        return 2
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        print(f"pyddl bench allreduce: unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}", file=sys.stderr)
        return 2
    if not _in_job():
        tail = ["allreduce", "--sizes", args.sizes, "--algorithms", args.algorithms,
                "--iters", str(args.iters), "--warmup", str(args.warmup), "--dtype", args.dtype,
                "--framework", args.framework, "--api", args.api, "--tensors", ",".join(tensors)]
        if args.compression:
            tail += ["--compression", args.compression]
        if args.json:
            tail += ["--json", os.path.abspath(args.json)]
        if args.link_gbps:
            tail += ["--link-gbps", str(args.link_gbps)]
        return _relaunch(args, tail)
    if args.framework == "jax":  # a ResNet-50 pytree instead of --sizes; see bench/jax_allreduce.py
        from pyddl.bench import jax_allreduce

        jax_allreduce.main(algorithms, args.iters, args.warmup, args.json, args.link_gbps)
        return 0
    from pyddl.bench import allreduce as bench

    bench.main(sizes, algorithms, args.iters, args.warmup, args.json, args.link_gbps, bench.DTYPES[dtype], args.api,
               tensors, args.compression)
    return 0


def _bench_module(args):
    """The step bench of args.framework: pyddl.bench.step (torch) or .tensorflow_step."""
    if getattr(args, "framework", "torch") == "tensorflow":
        from pyddl.bench import tensorflow_step

        return tensorflow_step
    from pyddl.bench import step

    return step


def _bench_command(args, systems: list[str], out: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "pyddl.cli.main", "bench", "step", "--systems", ",".join(systems),
            "--framework", getattr(args, "framework", "torch"), "--model", args.model, "--batch", str(args.batch), "--image-size", str(args.image_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--bucket-mb", str(args.bucket_mb),
            "--rounds", str(args.rounds), "--out", out)


def _run_step_jobs(args, jobs) -> list[dict]:
    """Run each (RunConfig factory(out path), label) job of the step bench; return all rows."""
    import json
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="pyddl-bench-") as tmp:
        for i, (make, label) in enumerate(jobs):
            out = os.path.join(tmp, f"job{i}.json")
            print(label, flush=True)
            launch(make(out))
            with open(out) as fh:
                rows.extend(json.load(fh))
    return rows


def _single_job(args, threads: str):
    from pyddl.launch.config import RunConfig

    def make(out):
        command = _bench_command(args, ["single"], out)
        if getattr(args, "emulate_pin", False):
            command = ("taskset", "-c", "0", *command)  # as pinned as one emulated server's rank
        return RunConfig(nproc=1, command=command, timeout_s=args.timeout, extra_env={"OMP_NUM_THREADS": threads})

    return make, f"one worker alone ({args.model}, batch {args.batch}, {args.image_size} px, {threads} thread(s)):"


def _check_systems(args, what: str) -> list[str] | None:
    """Validate --steps/--rounds and --systems, filling in the framework's default systems
    and model. Loads no framework: a typo fails at once."""
    from pyddl.bench import systems as catalog

    tensorflow = getattr(args, "framework", "torch") == "tensorflow"
    args.model = args.model or ("small_cnn" if tensorflow else "resnet18")
    if tensorflow and args.model not in catalog.TENSORFLOW_MODELS:
        print(f"pyddl bench {what}: --framework tensorflow times --model {' or '.join(catalog.TENSORFLOW_MODELS)}, "
              f"got {args.model!r}", file=sys.stderr)
        return None
    known = catalog.TENSORFLOW_SYSTEMS if tensorflow else catalog.TORCH_SYSTEMS
    defaults = catalog.tensorflow_default_systems() if tensorflow else catalog.torch_default_systems()
    args.systems = args.systems or ",".join(["single"] + defaults)
    for flag in ("steps", "rounds"):
        if getattr(args, flag) < 1:
            print(f"pyddl bench {what}: --{flag} must be at least 1, got {getattr(args, flag)}", file=sys.stderr)
            return None
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in systems if x not in known]
    if unknown:
        print(f"pyddl bench {what}: unknown system(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return None
    return systems


def _finish(rows: list[dict], args, extra: dict) -> list[dict]:
    import json

    from pyddl.bench import step as bench

    rows = bench.judge(_bench_module(args).summarize(rows))
    print(bench.format_table(rows))
    for block in (bench.format_exposed(rows), bench.format_threads(rows)):
        if block:
            print(block)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "batch_per_worker": args.batch, "image_size": args.image_size,
                       **extra, "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    return rows


def _step(args) -> int:
    systems = _check_systems(args, "step")
    if systems is None:
        return 2
    if args.out and getattr(args, "framework", "torch") == "tensorflow":
        _bench_module(args).worker_main(args.out, systems, args.model, args.batch, args.image_size, args.steps,
                                        args.warmup, args.rounds)
        return 0
    _under_runs(args)
    if args.out:  # a worker of a job this command started
        from pyddl.bench import step as bench

        bench.worker_main(args.out, systems, args.model, args.batch, args.image_size, args.steps, args.warmup,
                          args.bucket_mb, args.rounds)
        return 0
    if _in_job():
        print("pyddl bench step launches its own jobs (one worker alone, then -np N); run it outside pyddl run", file=sys.stderr)
        return 2
    if args.nproc < 2:
        print("pyddl bench step: -np must be at least 2 (it compares N workers with one alone)", file=sys.stderr)
        return 2
    threads = str(max(1, (os.cpu_count() or 1) // args.nproc))
    multi = [x for x in systems if x != "single"]
    jobs = [_single_job(args, threads)] if "single" in systems else []
    jobs.append((lambda out: config_from_args(args, _bench_command(args, multi, out)), f"{args.nproc} workers:"))
    return _launched("bench step", lambda: _finish(_run_step_jobs(args, jobs), args, {}))


def _scaling(args) -> int:
    systems = _check_systems(args, "scaling")
    if systems is None:
        return 2
    _under_runs(args)
    try:
        counts = sorted({int(w) for w in args.workers.split(",")})
    except ValueError:
        print(f"pyddl bench scaling: --workers must be comma-separated counts, got {args.workers!r}", file=sys.stderr)
        return 2
    if not counts or counts[0] < 1:
        print("pyddl bench scaling: worker counts must be >= 1", file=sys.stderr)
        return 2
    emulate = args.emulate_link_gbps is not None
    if emulate and any(n % args.ranks_per_server for n in counts if n > 1):
        print(f"pyddl bench scaling: every worker count must be a multiple of --ranks-per-server {args.ranks_per_server}", file=sys.stderr)
        return 2
    threads = str(max(1, (os.cpu_count() or 1) // max(counts)))
    jobs = [_single_job(args, threads)]
    multi = [x for x in systems if x != "single"]
    for n in (c for c in counts if c > 1):
        def make(out, n=n):
            # One emulated server per ranks_per_server workers.
            job_args = argparse.Namespace(**{**vars(args), "nproc": n,
                                             "emulate_nodes": n // args.ranks_per_server if emulate else None})
            return config_from_args(job_args, _bench_command(args, multi, out))
        where = f" on {n // args.ranks_per_server} emulated servers at {args.emulate_link_gbps:g} Gbit/s" if emulate else ""
        jobs.append((make, f"{n} workers{where}:"))
    def body():
        rows = _finish(_run_step_jobs(args, jobs), args, {"workers": counts, "emulate_link_gbps": args.emulate_link_gbps,
                                                          "ranks_per_server": args.ranks_per_server if emulate else None})
        if args.plot:
            from pyddl.bench import step as bench

            bench.plot(rows, args.plot, f"{args.model}, batch {args.batch}/worker, {args.image_size} px"
                       + (f", {args.emulate_link_gbps:g} Gbit/s links" if emulate else ""))
            print(f"wrote {args.plot}")

    return _launched("bench scaling", body)


def _add_step_flags(parser) -> None:
    from pyddl.bench.systems import tensorflow_default_systems, torch_default_systems

    parser.add_argument("--model", help="small_cnn or a torchvision classifier (default resnet18); "
                        "with --framework tensorflow, small_cnn (default) or resnet50 (Keras)")
    parser.add_argument("--batch", type=int, default=32, help="images per worker per step")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps per system per round, interleaved step by step with the other systems")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system before the first round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; comm eff is the median of the per-round ratios (the median step pools all rounds)")
    parser.add_argument("--bucket-mb", type=float, default=0.0,
                        help="gradient bucket size for DDP and pyddl alike (default: each system's own default)")
    parser.add_argument("--systems", help="comma-separated systems (default: single and the framework's defaults: "
                        f"{','.join(torch_default_systems())}; with --framework tensorflow "
                        f"{','.join(tensorflow_default_systems())})")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (a bare name: under runs/)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark collectives and training steps")
    which = parser.add_subparsers(dest="bench", metavar="BENCH")
    which.required = True
    ar = which.add_parser(
        "allreduce",
        help="allreduce time, algbw and busbw per size and algorithm",
        description="Examples:\n  pyddl bench allreduce -np 4 --sizes 1M,16M,64M\n"
        "  pyddl run -np 4 --topology 2x2 pyddl bench allreduce --algorithms native,multiring",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(ar, default_np=4)
    ar.add_argument("--sizes", default="1M,16M,64M", help="comma-separated sizes (K/M/G = KiB/MiB/GiB)")
    ar.add_argument("--algorithms", default="native,multiring,auto", help="comma-separated algorithms")
    ar.add_argument("--iters", type=int, default=5, help="timed repetitions per size (median reported)")
    ar.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    ar.add_argument("--dtype", default="float32",
                    help="element type: float32 (default), float16 or bfloat16 (what an fp16/bf16 wire moves)")
    ar.add_argument("--api", choices=("pyddl", "backend"), default="pyddl",
                    help="pyddl: pyddl.allreduce per algorithm; backend: dist.all_reduce and "
                    "dist.reduce_scatter_tensor on a group of backend pyddl per algorithm and on Gloo")
    ar.add_argument("--tensors",
                    help="where each call's tensor comes from: reused (one buffer, the best case), fresh (new "
                    "per call, reduced in place) and out (new per call, out of place); default: all three")
    ar.add_argument("--compression", choices=CODECS,
                    help="wire codec of every call (pyddl.allreduce(..., compression=)); the bound is that of "
                    "the bytes on the wire (default: the job's, PYDDL_COMPRESSION, else none)")
    ar.add_argument("--link-gbps", type=float, help="servers' NIC rate for the bound (set by emulation)")
    ar.add_argument("--framework", choices=["torch", "jax"], default="torch",
                    help="jax: a ResNet-50 pytree through pyddl.jax against JAX's own psum (needs pyddl[jax])")
    ar.add_argument("--json", metavar="PATH", help="also write the rows as JSON (a bare name: under runs/)")
    ar.set_defaults(func=_allreduce)

    st = which.add_parser(
        "step",
        help="training-step time: one worker, torch DDP and pyddl side by side",
        description="Example:\n  pyddl bench step --model resnet18 --batch 32 --image-size 112 -np 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(st, default_np=2)
    _add_step_flags(st)
    st.add_argument("--framework", choices=("torch", "tensorflow"), default="torch",
                    help="torch: DDP and pyddl.torch; tensorflow: a Keras CNN under pyddl.keras and "
                    "MultiWorkerMirroredStrategy (needs pyddl[tensorflow])")
    st.add_argument("--out", help=argparse.SUPPRESS)
    st.set_defaults(func=_step)

    sc = which.add_parser(
        "scaling",
        help="throughput and scaling efficiency over worker counts, DDP and pyddl, table + PNG + JSON",
        description="Example (2 emulated servers at 1 Gbit/s, one pinned worker each):\n"
        "  pyddl bench scaling --model resnet18 --batch 32 --image-size 112 --workers 1,2 \\\n"
        "      --emulate-link-gbps 1 --emulate-pin --plot scaling.png --json scaling.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(sc, default_np=None)
    _add_step_flags(sc)
    sc.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    sc.add_argument("--ranks-per-server", type=int, default=1, help="workers per emulated server")
    sc.add_argument("--plot", metavar="PNG", default="scaling.png", help="where to write the plot (a bare name: under runs/; default %(default)s)")
    sc.set_defaults(func=_scaling)
