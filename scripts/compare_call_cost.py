"""Compare the cost of one small allreduce between two checkouts of pyddl, side by side.

    git worktree add /tmp/pyddl-base HEAD~1
    .venv/bin/python scripts/compare_call_cost.py --base /tmp/pyddl-base/src --rounds 5
    .venv/bin/python scripts/compare_call_cost.py --base /tmp/pyddl-base/src --rounds 5 --named

Runs a 2-rank job (torch's own launcher, loopback Gloo) with each checkout in turn, `--rounds`
times, interleaved so the machine's drift falls on both alike. Each job times `--calls`
calls of `pyddl.allreduce_` on a 1 KiB tensor through the public API (with `--named`,
Horovod's `hvd.allreduce_(x, name="small", op=hvd.Sum)`: what matching by name costs) and reports,
per call, the wall time and the process CPU time (all threads: the engine, Gloo's, the
heartbeat), the slower rank's. Prints the median per checkout, the ratio this/base, and says
when a checkout's own rounds spread by more than 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PROBE = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import pyddl
    import pyddl.torch as hvd

    pyddl.init(allreduce=sys.argv[2])
    x = torch.ones(256)  # 1 KiB of float32
    if sys.argv[3] == "named":
        call = lambda: hvd.allreduce_(x, name="small", op=hvd.Sum)
    else:
        call = lambda: pyddl.allreduce_(x)
    for _ in range(50):
        call()  # warm-up: connections, buffers
    pyddl.barrier()
    calls = int(sys.argv[1])
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call()
    wall, cpu = (time.perf_counter() - wall0) / calls, (time.process_time() - cpu0) / calls
    worst = pyddl.allreduce(torch.tensor([wall, cpu], dtype=torch.float64), op="max").tolist()
    if pyddl.rank() == 0:
        print("RESULT " + json.dumps({"wall_us": worst[0] * 1e6, "cpu_us": worst[1] * 1e6}))
    pyddl.shutdown()
""")


def _run(src: str, probe: str, calls: int, algorithm: str, named: bool, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           probe, str(calls), algorithm, "named" if named else "plain"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise SystemExit(f"the job with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the other checkout's src/ folder")
    parser.add_argument("--this", default=str(Path(__file__).resolve().parents[1] / "src"),
                        help="this checkout's src/ folder (default: the one holding this script)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--algorithm", default="native", choices=("native", "multiring"))
    parser.add_argument("--named", action="store_true", help="time Horovod's named allreduce_ instead")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.py")
        Path(probe).write_text(PROBE)
        for r in range(args.rounds):
            for name in ("base", "this") if r % 2 == 0 else ("this", "base"):
                rows[name].append(_run(getattr(args, name), probe, args.calls, args.algorithm, args.named, 29700 + r))
                print(f"round {r + 1} {name}: {rows[name][-1]['wall_us']:.0f} us wall, "
                      f"{rows[name][-1]['cpu_us']:.0f} us CPU per call", flush=True)
    what = "named hvd.allreduce_" if args.named else "allreduce_"
    print(f"\n1 KiB {what} ({args.algorithm}), 2 ranks, {args.calls} calls x {args.rounds} rounds, median per call:")
    for metric in ("wall_us", "cpu_us"):
        base = statistics.median(x[metric] for x in rows["base"])
        this = statistics.median(x[metric] for x in rows["this"])
        print(f"  {metric[:-3]:5s} base {base:7.0f} us   this {this:7.0f} us   this/base {this / base:.3f}")
        for name in rows:
            values = [x[metric] for x in rows[name]]
            spread = (max(values) - min(values)) / statistics.median(values)
            if spread > 0.2:
                print(f"  note: {name}'s {metric[:-3]} rounds spread by {spread:.0%} (a busy machine): "
                      "treat the ratio as rough")
    return 0


if __name__ == "__main__":
    sys.exit(main())
