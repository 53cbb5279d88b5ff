"""Run Horovod's own PyTorch tests (test/parallel/test_torch.py, its CPU subset) against pyddl.torch.

    .venv/bin/python scripts/horovod_tests.py /path/to/horovod                # a checkout
    .venv/bin/python scripts/horovod_tests.py /path/to/horovod.git --mode each
    .venv/bin/python scripts/horovod_tests.py SRC --mode both -k allreduce --keep /tmp/hvdtests

SRC is a Horovod checkout or a bare git repository (read at --rev, default HEAD). Nothing of
Horovod is kept in pyddl: the script exports test/parallel/test_torch.py, test/conftest.py,
test/utils/common.py and horovod/runner/util/threads.py (a stdlib-only helper that common.py
imports) into a temporary folder, next to a shim package in which `import horovod.torch`
*is* pyddl.torch (the same module object) and `horovod` is pyddl's `run` and `__version__`.
`mock` (the PyPI backport that common.py imports) maps to the standard unittest.mock. No other
horovod.* module exists in the shim, so a test that reaches Horovod's internals fails with
ModuleNotFoundError instead of passing.

Modes (`--mode`):
  job   as Horovod's CI runs them: one 2-rank job, every rank running pytest on the whole
        file, from test/parallel: `pyddl run -np 2 python -m pytest -v test_torch.py`
        (Horovod: `horovodrun -np 2 --gloo pytest -v test_torch.py`).
  each  every test in its own 2-rank job, to tell "fails alone" from "fails after an
        earlier failure left the job broken".
  both  job, then each for the tests that did not pass in the job (one that passes after
        the others passes alone), then the tests whose outcome differs.

Deselected (the CPU subset; Horovod's tests skip GPU ones themselves without CUDA, these are
deselected by name so the counts are of what pyddl is meant to run):
  GPU:       test_gpu_required, test_horovod_allreduce_multi_gpu,
             test_horovod_allreduce_cpu_gpu_error, test_horovod_grouped_allreduce_cpu_gpu_error,
             test_horovod_alltoall_splits_on_gpu, test_broadcast_state_gpu
  Adasum:    test_horovod_reducescatter_adasum (pyddl has no Adasum; docs/horovod.md)
  timeline:  test_timeline_api (HOROVOD_TIMELINE's format; Horovod skips it too, #2496)
test_delta_optimizer stays: it uses Adasum but skips itself without MPI.

Each rank records every test's outcome as it ends (a small pytest plugin, so a job killed by
--job-timeout still reports what ran) and writes Horovod's junit XML (junit.RANK.xml). The
summary gives passed/failed/skipped per mode (a test fails if it fails on any rank) and, for
each failing test, the ranks and the first line of the error. Workers get PYTHONPATH = the
shim + this checkout's src, so the pyddl tested is this checkout's (printed first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_SRC = Path(__file__).resolve().parent.parent / "src"
TEST_FILE = "test/parallel/test_torch.py"
EXPORTED = (TEST_FILE, "test/conftest.py", "test/utils/common.py", "horovod/runner/util/threads.py")

DESELECTED = {
    "test_gpu_required": "GPU",
    "test_horovod_allreduce_multi_gpu": "GPU",
    "test_horovod_allreduce_cpu_gpu_error": "GPU",
    "test_horovod_grouped_allreduce_cpu_gpu_error": "GPU",
    "test_horovod_alltoall_splits_on_gpu": "GPU",
    "test_broadcast_state_gpu": "GPU",
    "test_horovod_reducescatter_adasum": "Adasum",
    "test_timeline_api": "timeline",
}

SHIM = {
    "horovod/__init__.py": (
        '"""Shim for running Horovod\'s own tests: the horovod package over pyddl."""\n'
        "from pyddl import __version__, run  # noqa: F401\n"
    ),
    "horovod/torch/__init__.py": (
        '"""Shim: `import horovod.torch` gives pyddl.torch itself (the same module object)."""\n'
        "import sys\n\nimport pyddl.torch\n\nsys.modules[__name__] = pyddl.torch\n"
    ),
    "horovod/runner/__init__.py": '"""Shim: only runner.util.threads (exported from Horovod) exists."""\n',
    "horovod/runner/util/__init__.py": "",
    "mock.py": '"""Shim: the PyPI `mock` backport is the standard unittest.mock."""\nfrom unittest.mock import *  # noqa: F401,F403\n',
    "hvdtest_report.py": (
        '"""pytest plugin: append each test phase\'s outcome to $HVDTEST_REPORT_DIR/rank<RANK>.jsonl as it ends."""\n'
        "import json\nimport os\n\n\n"
        "def _first_line(report):\n"
        "    crash = getattr(report.longrepr, 'reprcrash', None)\n"
        "    if crash is not None:\n"
        "        return crash.message.strip().splitlines()[0] if crash.message.strip() else ''\n"
        "    if isinstance(report.longrepr, tuple):  # a skip: (path, lineno, reason)\n"
        "        return str(report.longrepr[2])\n"
        "    text = str(report.longrepr or '').strip()\n"
        "    return text.splitlines()[-1] if text else ''\n\n\n"
        "def pytest_runtest_logreport(report):\n"
        "    path = os.path.join(os.environ['HVDTEST_REPORT_DIR'], 'rank%s.jsonl' % os.environ.get('RANK', '0'))\n"
        "    line = dict(nodeid=report.nodeid, when=report.when, outcome=report.outcome,\n"
        "                message=_first_line(report) if report.outcome != 'passed' else '',\n"
        "                duration_s=round(report.duration, 3))\n"
        "    with open(path, 'a') as f:\n"
        "        f.write(json.dumps(line) + '\\n')\n"
    ),
}


def export_horovod(source: Path, rev: str, dest: Path) -> None:
    """Copy Horovod's files that the tests need from a checkout or a bare git repository into dest."""
    is_checkout = (source / TEST_FILE).is_file()
    is_git = (source / "HEAD").is_file() and (source / "objects").is_dir()
    if not (is_checkout or is_git):
        raise ValueError(f"{source} is neither a Horovod checkout (no {TEST_FILE}) nor a bare git repository "
                         "(no HEAD and objects/); pass the folder that holds Horovod's setup.py, or its .git")
    for rel in EXPORTED:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_checkout:
            shutil.copyfile(source / rel, target)
        else:
            blob = subprocess.run(["git", f"--git-dir={source}", "show", f"{rev}:{rel}"],
                                  check=True, capture_output=True).stdout
            target.write_bytes(blob)
    # Horovod's setup.cfg holds its pytest settings (norecursedirs=test/utils); keep pytest
    # from searching for an ini file above the temporary folder.
    (dest / "pytest.ini").write_text("[pytest]\nnorecursedirs = test/utils\n")
    for rel, text in SHIM.items():
        target = dest / "shim" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    shutil.move(str(dest / "horovod/runner/util/threads.py"), dest / "shim/horovod/runner/util/threads.py")
    shutil.rmtree(dest / "horovod")


def worker_env(dest: Path, report_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(dest / "shim"), str(REPO_SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["HVDTEST_REPORT_DIR"] = str(report_dir)
    return env


def collect(dest: Path, selection: list[str]) -> list[str]:
    """The names of the tests pytest selects (collected in this process, without ranks)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *selection, "test_torch.py"],
                         cwd=dest / "test/parallel", env=worker_env(dest, dest), capture_output=True, text=True)
    ids = [line.split("::")[-1] for line in out.stdout.splitlines() if line.startswith(f"{TEST_FILE}::")]
    if not ids:
        raise RuntimeError(f"pytest collected nothing:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return ids


def run_job(dest: Path, tests: list[str], report_dir: Path, args: argparse.Namespace, timeout_s: float, log) -> int:
    """One `pyddl run -np N python -m pytest` job over `tests`; returns its exit code (124 after timeout_s)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pyddl.cli.main", "run", "-np", str(args.np), "--timeout", str(args.collective_timeout),
           "python", "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "hvdtest_report",
           f"--timeout={args.test_timeout}", f"--junit-xml={report_dir}/junit.$RANK.xml",
           *(f"test_torch.py::TorchTests::{name}" for name in tests)]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=dest / "test/parallel", env=worker_env(dest, report_dir),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)  # the launcher's own session: it, its agent and the workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.write(f"\n[horovod_tests] job killed after {timeout_s} s\n")
        return 124


def read_outcomes(report_dir: Path, tests: list[str], np: int) -> dict[str, dict]:
    """Per test: outcome ('passed', 'failed', 'skipped', 'missing') over all ranks, failing ranks, message."""
    phases: dict[tuple[str, int], list[dict]] = {}
    for rank in range(np):
        path = report_dir / f"rank{rank}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                phases.setdefault((rec["nodeid"].split("::")[-1], rank), []).append(rec)
    result = {}
    for test in tests:
        per_rank = {}
        for rank in range(np):
            recs = phases.get((test, rank))
            if not recs or not any(r["when"] == "teardown" for r in recs):
                per_rank[rank] = ("missing", "no result: the job ended during or before this test")
                continue
            bad = [r for r in recs if r["outcome"] == "failed"]
            if bad:
                where = "" if bad[0]["when"] == "call" else f"[{bad[0]['when']}] "
                per_rank[rank] = ("failed", where + bad[0]["message"])
            elif any(r["outcome"] == "skipped" for r in recs):
                per_rank[rank] = ("skipped", next(r["message"] for r in recs if r["outcome"] == "skipped"))
            else:
                per_rank[rank] = ("passed", "")
        for outcome in ("failed", "missing", "skipped", "passed"):
            ranks = [r for r, (o, _) in per_rank.items() if o == outcome]
            if ranks:
                result[test] = dict(outcome=outcome, ranks=ranks, message=per_rank[ranks[0]][1])
                break
    return result


def summarize(mode: str, outcomes: dict[str, dict], wall_s: float) -> str:
    counts = {k: sum(1 for o in outcomes.values() if o["outcome"] == k) for k in ("passed", "failed", "skipped", "missing")}
    lines = [f"== mode {mode}: {len(outcomes)} tests, {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['skipped']} skipped, {counts['missing']} without a result ({wall_s:.0f} s)"]
    for test, o in outcomes.items():
        if o["outcome"] in ("failed", "missing", "skipped"):
            lines.append(f"  {o['outcome']:7} {test} (rank {','.join(map(str, o['ranks']))}): {o['message'][:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a Horovod checkout, or a bare git repository of Horovod")
    parser.add_argument("--rev", default="HEAD", help="the revision to read from a bare repository (default HEAD)")
    parser.add_argument("--mode", choices=("job", "each", "both"), default="both")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run fewer tests")
    parser.add_argument("-np", dest="np", type=int, default=2, help="ranks per job (default 2, as Horovod's CI)")
    parser.add_argument("--test-timeout", type=float, default=300, help="pytest-timeout per test, s (default 300)")
    parser.add_argument("--collective-timeout", type=float, default=60,
                        help="pyddl run --timeout: a collective waiting this long fails (default 60 s)")
    parser.add_argument("--job-timeout", type=float, default=None,
                        help="kill a job after this many s (default: 3600 for mode job, 300 per test for each)")
    parser.add_argument("--keep", type=Path,
                        help="work in this folder (emptied first); default: a new temp dir, left in place for its log")
    parser.add_argument("--json", type=Path, help="also write every outcome to this JSON file")
    args = parser.parse_args(argv)

    dest = Path(tempfile.mkdtemp(prefix="hvdtests-")) if args.keep is None else args.keep.resolve()
    if args.keep is not None:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
    export_horovod(args.source.resolve(), args.rev, dest)
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch as h, pyddl; print(pyddl.__file__, h.__name__)"],
                           env=worker_env(dest, dest), capture_output=True, text=True, check=True)
    print(f"pyddl under test: {probe.stdout.strip()}; work folder: {dest}", flush=True)

    selection = [f"--deselect={TEST_FILE}::TorchTests::{name}" for name in DESELECTED]
    if args.keyword:
        selection += ["-k", args.keyword]
    tests = collect(dest, selection)
    unknown = sorted(set(DESELECTED) - set(collect(dest, [])))
    if unknown:
        print(f"note: deselected names not in this test_torch.py: {', '.join(unknown)}")
    print(f"{len(tests)} tests selected ({len(DESELECTED)} deselected: GPU, Adasum, timeline)", flush=True)

    results: dict[str, dict[str, dict]] = {}
    summaries = []
    with open(dest / "log.txt", "w") as log:
        if args.mode in ("job", "both"):
            t0 = time.monotonic()
            rc = run_job(dest, tests, dest / "job", args, args.job_timeout or 3600, log)
            results["job"] = read_outcomes(dest / "job", tests, args.np)
            summaries.append(summarize("job", results["job"], time.monotonic() - t0) + f"\n  (job exit code {rc})")
            print(summaries[-1], flush=True)
        if args.mode in ("each", "both"):
            t0 = time.monotonic()
            alone = tests if args.mode == "each" else [t for t in tests if results["job"][t]["outcome"] != "passed"]
            results["each"] = {}
            for i, test in enumerate(alone):
                report_dir = dest / "each" / test
                run_job(dest, [test], report_dir, args, args.job_timeout or 300, log)
                results["each"].update(read_outcomes(report_dir, [test], args.np))
                print(f"  [{i + 1}/{len(alone)}] {results['each'][test]['outcome']:7} {test}", flush=True)
            summaries.append(summarize("each", results["each"], time.monotonic() - t0))
            print(summaries[-1], flush=True)
    if len(results) == 2:
        differ = [t for t in results["each"] if results["job"][t]["outcome"] != results["each"][t]["outcome"]]
        print(f"== outcome differs between modes ({len(differ)}): job -> each")
        for t in differ:
            print(f"  {t}: {results['job'][t]['outcome']} -> {results['each'][t]['outcome']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"log: {dest / 'log.txt'}")
    return 0 if all(o["outcome"] in ("passed", "skipped") for r in results.values() for o in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
