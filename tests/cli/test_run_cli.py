"""`pyddl run` and `pyddl bench allreduce` end to end, as a user types them."""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.cli, pytest.mark.timeout(120)]

PYDDL = [sys.executable, "-m", "pyddl.cli.main"]


def _run(args, cwd, timeout=100, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(extra_env or {})
    return subprocess.run(PYDDL + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_run_four_workers_prefixes_output_by_rank(tmp_path):
    script = _script(tmp_path, """
        import sys, torch, pyddl
        pyddl.init()
        total = pyddl.allreduce(torch.tensor([pyddl.rank() + 1])).item()
        s = pyddl.settings()
        print(f"rank {pyddl.rank()} of {pyddl.size()} sum {total} {sys.argv[1:]} {s.allreduce} {s.timeout_s:g}")
        pyddl.shutdown()
    """)
    proc = _run(["run", "-np", "4", "--allreduce", "multiring", "--timeout", "45", script, "--flag", "x"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for r in range(4):
        assert f"[rank{r}] rank {r} of 4 sum 10 ['--flag', 'x'] multiring 45" in proc.stdout


def test_a_line_written_in_pieces_is_not_cut_by_another_ranks_line(tmp_path):
    # Under PYTHONUNBUFFERED=1 print() writes a line and its newline separately; here rank 0
    # pauses between the two halves of each line while the others print whole lines.
    script = _script(tmp_path, """
        import os, sys, time
        rank = int(os.environ["RANK"])
        for i in range(3):
            if rank == 0:
                sys.stdout.write(f"first half {i} "); sys.stdout.flush()
                time.sleep(0.4)
                sys.stdout.write("second half\\n"); sys.stdout.flush()
            else:
                for _ in range(4):
                    print(f"whole line {i}", flush=True)
                    time.sleep(0.1)
        sys.stdout.write("no newline at the end")
    """)
    proc = _run(["run", "-np", "3", script], tmp_path, extra_env={"PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for i in range(3):
        assert f"[rank0] first half {i} second half" in lines
    assert all(line.count("[rank") == 1 for line in lines if "[rank" in line), proc.stdout
    assert sum(line.endswith("] no newline at the end") for line in lines) == 3


def test_the_allreduce_demo_of_the_readme(tmp_path):
    demo = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "allreduce_demo.py")
    proc = _run(["run", "-np", "4", "--topology", "2x2", demo], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for alg in ("native", "multiring", "auto"):
        assert f"{alg}: 16 MiB allreduce over 4 ranks (2x2) in" in proc.stdout
    assert proc.stdout.count("every element == 10: True") == 3
    assert "allgather of ranks: [0.0, 1.0, 2.0, 3.0]; local 0/2, server 0/2" in proc.stdout


def test_the_gradient_stream_script_of_the_emulation_docs(tmp_path):
    # docs/emulation.md quotes its figures; here on loopback, 2 "servers" of 1 rank.
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gradient_stream.py")
    proc = _run(["run", "-np", "2", "--topology", "1x2", script, "--params", "300000", "--rounds", "1",
                 "--configs", "multiring:0.5,native:2:nocheck,multiring:0.5:views", "--link-gbps", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[rank0] 1.2 MB of gradients over 2 servers at 1 Gbit/s: link bound 10 ms" in proc.stdout
    rows = [line.split()[1:5] for line in proc.stdout.splitlines() if "MiB" in line]
    assert [r[:2] for r in rows] == [["multiring", "0.5"], ["native", "2"], ["multiring", "0.5"]], proc.stdout
    assert (rows[1][3], rows[2][3]) == ("nocheck", "views"), proc.stdout
    # A bad --configs is refused before the script joins a job, so it is seen from one process.
    for config, expected in (("multiring:two", "bucket size must be a number of MiB, got 'two'"),
                             ("multiring:2:fast", "ALGORITHM:BUCKET_MIB[:nocheck][:views], got 'multiring:2:fast'")):
        proc = subprocess.run([sys.executable, script, "--configs", config], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_workers_keep_freed_memory_unless_the_user_set_malloc_themselves(tmp_path):
    # glibc's tunables (pyddl.defaults.WORKER_MALLOC_ENV): without them every new tensor over
    # 32 MiB faults in fresh pages; a user's own value of either is left as it is.
    (tmp_path / "env.py").write_text("import os\nprint(os.environ.get('MALLOC_MMAP_THRESHOLD_'), "
                                     "os.environ.get('MALLOC_TRIM_THRESHOLD_'))\n")
    proc = _run(["run", "-np", "2", "env.py"], tmp_path, extra_env={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("2147483647 131072") == 2, proc.stdout


def test_run_python_dash_m(tmp_path):
    (tmp_path / "mymod.py").write_text("import pyddl\npyddl.init()\nprint('size', pyddl.size())\n")
    proc = _run(["run", "-np", "2", "python", "-m", "mymod"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("size 2") == 2


def test_failed_worker_is_named_and_the_rest_stop(tmp_path):
    script = _script(tmp_path, """
        import sys, time, torch, pyddl
        pyddl.init()
        if pyddl.rank() == 1:
            print("disk full while writing shard 7", file=sys.stderr, flush=True)
            open("failed_at", "w").write(repr(time.time()))
            sys.exit(7)
        pyddl.allreduce(torch.ones(1))  # the others wait here for rank 1
        time.sleep(60)
    """)
    proc = _run(["run", "-np", "3", "--timeout", "60", script], tmp_path)
    stopped_after = time.time() - float((tmp_path / "failed_at").read_text())
    assert proc.returncode == 7  # the failed worker's own code, as if it had run alone
    assert "rank 1 (local rank 1, pid " in proc.stderr and f"host {socket.gethostname()}) exited with code 7" in proc.stderr
    assert "disk full while writing shard 7" in proc.stderr
    assert "the other workers were stopped (ranks 0, 2)" in proc.stderr
    assert stopped_after < 10  # the others stopped within seconds, not at the 60 s collective timeout


def test_a_worker_stuck_before_init_is_named_by_the_others(tmp_path):
    script = _script(tmp_path, """
        import os, time, pyddl
        if os.environ["RANK"] == "2":
            time.sleep(60)  # stuck loading data, say: never reaches init in time
        pyddl.init()
    """)
    proc = _run(["run", "-np", "3", "--timeout", "5", script], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "CollectiveTimeoutError: pyddl.init: rank 0 waited 5 s for the other ranks of a 3-rank job" in proc.stderr
    assert "rank(s) 2 never did" in proc.stderr


def test_ctrl_c_stops_every_worker(tmp_path):
    script = _script(tmp_path, """
        import os, time, pyddl
        pyddl.init()
        open(f"pid{pyddl.rank()}", "w").write(str(os.getpid()))
        print("ready", flush=True)
        time.sleep(120)
    """)
    launcher = subprocess.Popen(PYDDL + ["run", "-np", "2", script], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_clean_env())
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        launcher.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        _, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130 and "interrupted" in err, err
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_killed_worker_names_the_signal(tmp_path):
    script = _script(tmp_path, """
        import os, signal, time, pyddl
        pyddl.init()
        if pyddl.rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    """)
    proc = _run(["run", "-np", "2", script], tmp_path)
    assert proc.returncode == 1
    assert "rank 0 (local rank 0" in proc.stderr and "killed by signal SIGKILL" in proc.stderr


def test_bad_flags_are_clear(tmp_path):
    proc = _run(["run", "-np", "4", "--topology", "3x2", "x.py"], tmp_path)
    assert proc.returncode == 2
    assert "world size 4 does not match topology 3x2" in proc.stderr
    proc = _run(["run", "-np", "2"], tmp_path)
    assert proc.returncode == 2 and "no command to run" in proc.stderr


@pytest.mark.parametrize("flags, text", [
    (["--timeout", "0"], "timeout must be a positive, finite number of seconds, got 0.0"),
    (["--timeout", "-5"], "got -5.0"),
    (["--timeout", "nan"], "got nan"),
    (["--timeout", "inf"], "got inf"),
    (["--chunk-bytes", "0"], "chunk_bytes must be a positive whole number of bytes, got 0"),
    (["--chunk-bytes", "-4096"], "got -4096"),
    (["--topology", ""], "the topology is empty"),
    (["--allreduce", "ring"], "invalid choice: 'ring'"),
])
def test_bad_settings_are_one_line_and_exit_2_before_any_worker_starts(tmp_path, flags, text):
    marker = tmp_path / "started"
    script = _script(tmp_path, f"open({str(marker)!r}, 'w').close()")
    proc = _run(["run", "-np", "2", *flags, script], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and text in lines[-1], proc.stderr
    # One line of ours; argparse's own choices check prints its usage above its line.
    assert (len(lines) == 1 or lines[0].startswith("usage: pyddl run")) and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("command, text", [
    (["missing.py"], "script 'missing.py' not found"),
    (["python", "gone.py", "--x"], "script 'gone.py' not found"),
    (["no-such-command-pyddl"], "command 'no-such-command-pyddl' not found on PATH"),
])
def test_a_command_that_cannot_start_is_one_line(tmp_path, command, text):
    proc = _run(["run", "-np", "2", *command], tmp_path)
    assert proc.returncode == 2 and text in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_allreduce_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        ["bench", "allreduce", "-np", "2", "--sizes", "64K,1M", "--algorithms", "native,multiring",
         "--iters", "2", "--json", str(out), "--link-gbps", "10"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "algbw Gb/s" in proc.stdout and "busbw Gb/s" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["world_size"] == 2
    assert data["meta"]["host"] == {"cpus": os.cpu_count(), "ranks": 2}  # both ranks on this machine
    rows = data["rows"]
    # Per size and algorithm: one buffer reused, a new one per call in place, and out of place.
    assert [(r["bytes"], r["algorithm"], r["tensor"]) for r in rows] == [
        (size, alg, kind) for size in (65536, 1048576) for alg in ("native", "multiring") for kind in ("reused", "fresh", "out")
    ]
    for r in rows:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"]
        assert 1 <= r["calls_per_sample"] <= 64  # short calls are timed back to back
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] * 8 / r["median_s"] / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * (2 - 1) / 2)
        assert r["bound_s"] is None  # one server: no inter-server link to bound by
        assert r["spread"] >= 0 and r["unreliable"] == (r["spread"] > 0.25)


def test_bench_allreduce_of_fp16_moves_half_the_elements_of_a_size(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["bench", "allreduce", "-np", "2", "--sizes", "1M", "--algorithms", "native,multiring",
                 "--iters", "2", "--dtype", "fp16", "--tensors", "reused", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "allreduce of float16 over 2 ranks" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["bytes"]) for r in rows] == [("float16", 2**20)] * 2


def test_bench_allreduce_on_an_fp16_wire_is_bounded_by_the_wire_bytes(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["bench", "allreduce", "-np", "2", "--topology", "1x2", "--sizes", "1M", "--algorithms",
                 "native,multiring", "--iters", "2", "--tensors", "fresh", "--compression", "fp16",
                 "--link-gbps", "1", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "allreduce of float32 (fp16 on the wire) over 2 ranks" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["algorithm"], r["compression"], r["bytes"]) for r in rows] == [
        ("native", "fp16", 2**20), ("multiring", "fp16", 2**20)]
    for r in rows:  # 2 servers of 1 rank: 2(M-1)/M x S / B, S the 512 KiB on the wire
        assert r["bound_s"] == pytest.approx(2**19 * 8 / 1e9)


def test_bench_rejects_bad_sizes(tmp_path):
    proc = _run(["bench", "allreduce", "--sizes", "12Q"], tmp_path)
    assert proc.returncode == 2 and "not a number" in proc.stderr
    proc = _run(["bench", "allreduce", "--compression", "fp16", "--api", "backend"], tmp_path)
    assert proc.returncode == 2 and "--compression applies to pyddl.allreduce" in proc.stderr
    proc = _run(["bench", "allreduce", "--dtype", "int8"], tmp_path)
    assert proc.returncode == 2 and "dtype 'int8' is not one of float32, float16, bfloat16" in proc.stderr
    proc = _run(["bench", "allreduce", "--tensors", "reused,new"], tmp_path)
    assert proc.returncode == 2 and "tensors 'reused,new': choose from reused, fresh, out" in proc.stderr


def test_bench_step_compares_systems(tmp_path):
    out = tmp_path / "step.json"
    proc = _run(
        ["bench", "step", "-np", "2", "--model", "small_cnn", "--batch", "4", "--image-size", "16",
         "--steps", "2", "--warmup", "1", "--rounds", "2",
         "--systems", "single,ddp,ddp-bf16,ddp-noop,pyddl-multiring-fp16,pyddl-native-bf16,pyddl-native-bf16-nocheck,pyddl-auto,"
         "pyddl-noop",
         "--json", str(out)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "comm eff" in proc.stdout and "scaling eff" in proc.stdout and "by thread (rank 0" in proc.stdout
    assert "round 2/2  pyddl-auto" in proc.stdout
    assert "exposed communication (step - pyddl-noop step in the same pass, median over passes)" in proc.stdout
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"single", "ddp", "ddp-bf16", "ddp-noop", "pyddl-multiring-fp16", "pyddl-native-bf16",
                         "pyddl-native-bf16-nocheck", "pyddl-auto", "pyddl-noop"}
    single = rows["single"]
    assert single["workers"] == 1 and rows["ddp"]["workers"] == 2
    for r in rows.values():  # 2 rounds of 2 timed steps, pooled
        assert len(r["step_times_s"]) == 4 and len(r["round_medians_s"]) == 2
        # each step's time is its slowest rank's, so never below rank 0's own
        assert r["median_step_s"] == pytest.approx(statistics.median(r["step_times_s"]))
        assert r["round_medians_s"][1] == pytest.approx(statistics.median(r["step_times_s"][2:]))
        assert statistics.fmean(r["step_times_s"]) >= r["rank0_mean_step_s"] - 1e-9
        assert r["rank0_thread_cpu_s_per_step"]["MainThread"] >= 0  # in clock ticks: 0 for a toy model
    assert "pyddl-engine" in rows["pyddl-multiring-fp16"]["rank0_thread_cpu_s_per_step"]
    for name in ("ddp", "pyddl-multiring-fp16"):
        r = rows[name]
        noop = rows["ddp-noop" if name == "ddp" else "pyddl-noop"]
        by_round = [n / m for n, m in zip(noop["round_medians_s"], r["round_medians_s"])]
        assert r["comm_efficiency"] == pytest.approx(statistics.median(by_round))
        assert r["comm_cpu_s"] == pytest.approx(r["cpu_s_per_step"] - noop["cpu_s_per_step"])
        assert r["ranks_per_core"] == max(1.0, 2 / len(os.sched_getaffinity(0)))  # 2 ranks on this machine
        assert r["cpu_bound_comm_efficiency"] == pytest.approx(
            noop["median_step_s"] / (noop["median_step_s"] + r["ranks_per_core"] * max(0.0, r["comm_cpu_s"])))
        assert r["exposed_comm_fraction"] == pytest.approx(1 - r["comm_efficiency"])
        plain = rows["pyddl-noop"]["round_medians_s"]
        assert r["plain_efficiency"] == pytest.approx(statistics.median(p / m for p, m in zip(plain, r["round_medians_s"])))
        assert r["scaling_efficiency"] == pytest.approx(r["images_per_s"] / (2 * single["images_per_s"]))
        assert r["images_per_s"] == pytest.approx(2 * 4 / r["median_step_s"])


def test_bench_step_rejects_unknown_system(tmp_path):
    proc = _run(["bench", "step", "--systems", "ddp,horovod"], tmp_path)
    assert proc.returncode == 2 and "unknown system(s) horovod" in proc.stderr
    proc = _run(["bench", "step", "--rounds", "0"], tmp_path)
    assert proc.returncode == 2 and "--rounds must be at least 1" in proc.stderr


def test_bench_scaling_writes_table_json_and_png(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    proc = _run(
        ["bench", "scaling", "--model", "small_cnn", "--batch", "4", "--image-size", "16", "--workers", "1,3",
         "--steps", "2", "--warmup", "1", "--systems", "single,ddp,ddp-noop,pyddl-native,pyddl-noop",
         "--json", str(out), "--plot", str(png)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["workers"] == [1, 3]
    got = sorted((r["system"], r["workers"]) for r in data["rows"])
    assert got == sorted([("single", 1)] + [(s, 3) for s in ("ddp", "ddp-noop", "pyddl-native", "pyddl-noop")])
    single = next(r for r in data["rows"] if r["system"] == "single")
    for r in data["rows"]:
        assert r["scaling_efficiency"] == pytest.approx(r["images_per_s"] / (r["workers"] * single["images_per_s"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = _run(["bench", "scaling", "--workers", "1,x"], tmp_path)
    assert proc.returncode == 2 and "comma-separated counts" in proc.stderr


_RANK_REPORT = """
    import os, sys, torch, pyddl
    from pyddl.env import read_job_env
    pyddl.init()
    total = pyddl.allreduce(torch.tensor([pyddl.rank() + 1])).item()
    # One write per line: the ranks share one stdout, unbuffered (python -u), and print()
    # would write the text and its newline separately, letting the other rank in between.
    sys.stdout.write(f"rank {pyddl.rank()} of {pyddl.size()} via {read_job_env().source} sum {total} parent {os.getppid()}\\n")
    pyddl.shutdown()
"""


def _scheduler_env(port, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


@pytest.mark.parametrize("kind", ["srun", "mpirun"])
def test_under_a_scheduler_each_process_runs_as_its_rank(tmp_path, kind):
    from harness import free_port

    script = _script(tmp_path, _RANK_REPORT)
    port = free_port()
    procs = []
    for r in range(2):
        if kind == "srun":  # what srun exports to task r of `srun -n 2`
            extra = dict(SLURM_JOB_ID="9", SLURM_STEP_ID="0", SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                         SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
                         SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost")
        else:  # what Open MPI's mpirun exports to rank r of `mpirun -np 2`
            extra = dict(OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(r),
                         OMPI_COMM_WORLD_LOCAL_SIZE="2")
        procs.append(subprocess.Popen(PYDDL + ["run", script], cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_scheduler_env(port, **extra)))
    outs = [p.communicate(timeout=100) for p in procs]
    source = "slurm" if kind == "srun" else "openmpi"
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err
        # No agent in between: the scheduler's process became the worker (exec), so the
        # worker's parent is this test, and its output carries no [rankN] prefix.
        assert out.strip() == f"rank {r} of 2 via {source} sum 3 parent {os.getpid()}"


def _fake_srun(tmp_path):
    """A stand-in for srun: records its arguments and starts 2 tasks with srun's variables."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "$@" > srun.args
        shift  # --kill-on-bad-exit=1
        pids=""
        for r in 0 1; do
          SLURM_STEP_ID=0 SLURM_PROCID=$r SLURM_LOCALID=$r SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=2 \\
          SLURM_STEP_TASKS_PER_NODE=2 SLURM_STEP_NODELIST=localhost "$@" &
          pids="$pids $!"
        done
        rc=0
        for p in $pids; do wait $p || rc=1; done
        exit $rc
    """))
    fake.chmod(0o755)
    from harness import free_port

    # What an sbatch script of `--ntasks 2` sees before any job step.
    return _scheduler_env(free_port(), SLURM_JOB_ID="9", SLURM_NTASKS="2", SLURM_PROCID="0",
                          PATH=f"{fake.parent}:{os.environ['PATH']}")


def test_in_an_allocation_pyddl_run_starts_itself_through_srun(tmp_path):
    env = _fake_srun(tmp_path)
    script = _script(tmp_path, _RANK_REPORT)
    proc = subprocess.run(PYDDL + ["run", "--allreduce", "multiring", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().split()
    assert args[0] == "--kill-on-bad-exit=1" and args[-4:] == ["run", "--allreduce", "multiring", script]
    assert sorted(line.split(" parent")[0] for line in proc.stdout.splitlines()) == [
        "rank 0 of 2 via slurm sum 3", "rank 1 of 2 via slurm sum 3"]


def test_in_an_allocation_pyddl_bench_launches_its_workers(tmp_path):
    # It used to run as "rank 0 of 2" of the allocation and wait for a rank that never came.
    env = _fake_srun(tmp_path)
    proc = subprocess.run(PYDDL + ["bench", "allreduce", "-np", "2", "--sizes", "4K", "--algorithms", "native"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "allreduce of float32 over 2 ranks" in proc.stdout


def test_in_an_allocation_pyddl_train_starts_itself_through_srun(tmp_path):
    # It used to train at once as "rank 0 of 2" and wait for a rank 1 that never started.
    env = _fake_srun(tmp_path)
    flags = ["--epochs", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(PYDDL + ["train", *flags], cwd=tmp_path, capture_output=True, text=True,
                          timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().split()
    assert args[0] == "--kill-on-bad-exit=1" and args[-5:] == ["train", *flags]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["epochs"] == 1


def test_multi_server_driver_without_root(tmp_path):
    # Two "servers" on this machine: the launcher template runs each server's command
    # locally (env marks which one), the rendezvous listens on 127.0.0.1 (node 0's "host").
    from harness import free_port

    script = _script(tmp_path, """
        import os, torch, pyddl
        pyddl.init()
        total = pyddl.allreduce(torch.tensor([pyddl.rank() + 1])).item()
        print(f"rank {pyddl.rank()} on {os.environ['SERVER']} node {pyddl.cross_rank()} sum {total}", flush=True)
        pyddl.shutdown()
    """)
    hosts = "127.0.0.1:2,127.0.0.2:2"
    proc = _run(["run", "-np", "4", "-H", hosts, "--master-port", str(free_port()), "--launcher",
                 "env SERVER={host}", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for r in range(4):
        assert f"[rank{r}] rank {r} on 127.0.0.{r // 2 + 1} node {r // 2} sum 10" in proc.stdout


def test_unreachable_servers_are_each_named(tmp_path):
    proc = _run(["run", "-np", "3", "-H", "good:1,bad1:1,bad2:1", "--launcher",
                 "sh -c 'case {host} in bad*) echo no route to {host} >&2; exit 255;; esac' x", "job.py"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "not reachable" in line]
    assert len(lines) == 2
    assert "server bad1 (node 1) is not reachable" in lines[0] and "exited with code 255: no route to bad1" in lines[0]
    assert "server bad2 (node 2) is not reachable" in lines[1]


_RESTARTABLE = """
    import json, os, signal, torch, pyddl
    ckpt = "ckpt.pt"
    pyddl.init()
    r = pyddl.rank()
    state = torch.load(ckpt) if os.path.exists(ckpt) else {"epoch": 0, "w": torch.zeros(3)}
    print("REPORT " + json.dumps(dict(start=state["epoch"], port=os.environ["MASTER_PORT"])), flush=True)
    w = state["w"]
    for epoch in range(state["epoch"], 4):
        if r == 1 and epoch == 2 and not os.path.exists("killed"):
            open("killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        w = w / 2 + pyddl.allreduce(torch.full((3,), float((r + 1) * (epoch + 1))))
        if r == 0:
            torch.save({"epoch": epoch + 1, "w": w}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        pyddl.barrier()
    print("REPORT " + json.dumps(dict(w=w.tolist())), flush=True)
    pyddl.shutdown()
"""


def test_max_restarts_on_one_server_resumes_with_a_fresh_store(tmp_path):
    w = 0.0
    for epoch in range(4):
        w = w / 2 + sum((r + 1) * (epoch + 1) for r in range(2))
    proc = _run(["run", "-np", "2", "--max-restarts", "1", _script(tmp_path, _RESTARTABLE)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    reps = [json.loads(line.split("REPORT ", 1)[1]) for line in proc.stdout.splitlines() if "REPORT " in line]
    starts = [x for x in reps if "start" in x]
    assert sorted(x["start"] for x in starts) == [0, 0, 2, 2]
    # The restarted workers meet in a new store: the dead ones' addresses are not in it.
    ports = {x["start"]: x["port"] for x in starts}
    assert ports[0] != ports[2]
    assert [x["w"] for x in reps if "w" in x] == [[w] * 3] * 2


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def _train_pids(root_pid):
    """Pids of `pyddl train` workers started (at any depth) by process `root_pid`."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as fh:
                    parent[int(d), "cmd"] = fh.read()
            except OSError:
                continue
    found = []
    for pid in [p for p in parent if isinstance(p, int)]:
        p = pid
        while p in parent and p != root_pid:
            p = parent[p]
        if p == root_pid and b"pyddl.train.worker" in parent.get((pid, "cmd"), b""):
            found.append(pid)
    return sorted(found)


def _final_params(out):
    import torch

    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    return torch.load(ckpts[-1], weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pyddl_train_resumes_after_a_restart_says_so_and_ends_as_if_never_stopped(tmp_path):
    # Issue 23 point 6: a job that lost a worker and restarted says who failed and where
    # training went on, in its output and its summary; and it trains on to the parameters of
    # a run that was never stopped.
    flags = ["-np", "2", "--epochs", "3", "--max-steps-per-epoch", "8", "--batch-size", "16", "--seed", "1"]
    launcher = subprocess.Popen(PYDDL + ["train", *flags, "--max-restarts", "1", "--out", "a"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env())
    output = []
    try:
        for line in launcher.stdout:
            output.append(line)
            if list((tmp_path / "a" / "checkpoints").glob("ckpt-*.pt")):
                pids = _train_pids(launcher.pid)
                assert len(pids) == 2, "the workers finished before one could be killed:\n" + "".join(output)
                killed = pids[-1]
                with open(f"/proc/{killed}/environ", "rb") as fh:
                    rank = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)[b"RANK"].decode()
                os.kill(killed, signal.SIGKILL)
                break
        output += launcher.stdout.readlines()
        launcher.wait(timeout=200)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = "".join(output)
    assert launcher.returncode == 0, text
    reason = f"rank {rank} (local rank {rank}), pid {killed}, was killed by signal SIGKILL"
    assert f"pyddl run: {reason}; restarting every worker (restart 1 of 1)" in text, text
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    [restart] = summary["restarts"]
    assert restart["restart"] == 1 and restart["failure"] == reason
    assert restart["resumed_from"] == f"a/checkpoints/ckpt-{restart['epoch']:06d}.pt" and restart["epoch"] >= 1
    assert (f"[rank0] restart 1 after {reason}: resuming from {restart['resumed_from']} at epoch "
            f"{restart['epoch']}") in text, text
    assert text.count("epoch 3/3") == 1, text  # resumed, not redone
    ref = subprocess.run(PYDDL + ["train", *flags, "--out", "b"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=200, env=_clean_env())
    assert ref.returncode == 0, ref.stderr
    a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_script_that_exits_after_a_caught_mismatch_keeps_its_exit_code(tmp_path):
    # Torn down at exit with pyddl's threads running, torch's process groups aborted the process
    # in about 1 run of 4 ("terminate called without an active exception": SIGABRT, rc 1).
    script = _script(tmp_path, """
        import sys, torch, pyddl
        pyddl.init(timeout_s=20)
        try:
            pyddl.allreduce(torch.ones(2 + pyddl.rank()))
        except pyddl.CollectiveMismatchError:
            print("caught", flush=True)
        sys.exit(3)
    """)
    proc = _run(["run", "-np", "6", script], tmp_path)  # six ranks, six teardowns that could abort
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "terminate called" not in proc.stdout + proc.stderr and proc.stdout.count("caught") == 6
