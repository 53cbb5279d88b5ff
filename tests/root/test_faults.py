"""Launching across servers and surviving faults, on emulated servers (issue 6).

Each test builds an emulated cluster (network namespaces on a bridge, pyddl.launch.emulate)
and starts the job with `pyddl run -H ADDR:2,ADDR:2 --launcher "ip netns exec <ns>{node}"`,
exactly as over ssh: one `pyddl run --nnodes 2 --node-rank i` per server, node 0 hosting the
rendezvous store. Faults are injected on purpose: a rank SIGKILLs itself at step k, a server's
link is set down mid-job. Needs root and iproute2; skipped otherwise.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pyddl.launch.emulate import EmulatedCluster

PYDDL = [sys.executable, "-m", "pyddl.cli.main"]
_CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
pytestmark = [
    pytest.mark.root,
    pytest.mark.cli,
    pytest.mark.skipif(not _CAN_EMULATE, reason="needs root and iproute2 (ip, tc): it creates network namespaces"),
]

_PRELUDE = """
    import json, os, signal, sys, time, torch, pyddl
    def netns():
        mine = os.stat("/proc/self/ns/net").st_ino
        names = [n for n in os.listdir("/run/netns") if os.stat(f"/run/netns/{n}").st_ino == mine]
        return names[0] if names else None
"""


def _script(tmp_path, body, name="job.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(_PRELUDE) + textwrap.dedent(body))
    return str(path)


def _env():
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME", "PYDDL_TOPOLOGY", "PYDDL_RESTART_COUNT")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _hosts_args(cluster, per_server, *flags):
    hosts = ",".join(f"{s.address}:{per_server}" for s in cluster.servers)
    return ["run", "-np", str(per_server * len(cluster.servers)), "-H", hosts,
            "--launcher", f"ip netns exec {cluster.netns_prefix}{{node}}", "--network-interface", "eth0", *flags]


def _reports(stdout):
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"\[rank(\d+)\] REPORT (.*)", line)
        if m:
            out.setdefault(int(m.group(1)), []).append(json.loads(m.group(2)))
    return out


def _pids_in(cluster):
    pids = []
    for s in cluster.servers:
        pids += subprocess.run(["ip", "netns", "pids", s.netns], capture_output=True, text=True).stdout.split()
    return pids


@pytest.mark.timeout(120)
def test_two_servers_by_two_ranks_through_H(tmp_path):
    script = _script(tmp_path, """
        import subprocess
        pyddl.init()
        r = pyddl.rank()
        x = torch.full((1001,), r + 1, dtype=torch.float32)  # 1001: not a multiple of the dims
        sums = {alg: sorted(set(pyddl.allreduce(x, algorithm=alg).tolist())) for alg in ("native", "multiring")}
        # Every socket listening on this server (the agent's stores on node 0, Gloo's).
        ss = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        listen = sorted({line.split()[3].rsplit(":", 1)[0] for line in ss.splitlines()})
        print("REPORT " + json.dumps(dict(netns=netns(), node=os.environ["GROUP_RANK"], cross=pyddl.cross_rank(),
              local=pyddl.local_rank(), spec=pyddl.topology().spec, sums=sums, listen=listen,
              master=os.environ["MASTER_ADDR"], ifname=os.environ.get("GLOO_SOCKET_IFNAME"))), flush=True)
        pyddl.shutdown()
    """)
    with EmulatedCluster(2, 1.0) as cluster:
        proc = subprocess.run(PYDDL + _hosts_args(cluster, 2, "--allreduce", "multiring", script), cwd=tmp_path,
                              capture_output=True, text=True, timeout=100, env=_env())
        assert proc.returncode == 0, proc.stderr
        rep = {r: v[0] for r, v in _reports(proc.stdout).items()}
        assert sorted(rep) == [0, 1, 2, 3]
        for r, got in rep.items():
            assert got["sums"] == {"native": [10.0], "multiring": [10.0]}  # ranks give r+1: 1+2+3+4
            assert (got["node"], got["cross"], got["local"], got["spec"]) == (str(r // 2), r // 2, r % 2, "2x2")
            assert got["netns"] == cluster.servers[r // 2].netns  # ranks fill the servers in -H order
            assert (got["master"], got["ifname"]) == (cluster.servers[0].address, "eth0")
        # The stores and Gloo listen on each server's own address only, never on every interface.
        for r, got in rep.items():
            assert got["listen"] == [cluster.servers[r // 2].address], got["listen"]


@pytest.mark.timeout(120)
def test_train_on_servers_checks_the_data_where_the_workers_run(tmp_path):
    # With -H the launching machine need not hold the data: the workers check it on their
    # servers, and the bad input reaches the user with their message and exit code 2.
    with EmulatedCluster(2) as cluster:
        hosts = ",".join(f"{s.address}:1" for s in cluster.servers)
        proc = subprocess.run(
            PYDDL + ["train", "-np", "2", "-H", hosts, "--launcher", f"ip netns exec {cluster.netns_prefix}{{node}}",
                     "--network-interface", "eth0", "--data", str(tmp_path / "no-such-data"), "--epochs", "1",
                     "--out", str(tmp_path / "run")],
            cwd=tmp_path, capture_output=True, text=True, timeout=100, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert "exited with code 2" in proc.stderr and "no-such-data" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_a_rank_that_exits_with_a_code_passes_it_through_every_launcher(tmp_path):
    # Bad input found by one worker (exit 2 by convention) must reach the user as 2, through
    # its server's launcher and the driver, as if the program had run alone.
    script = _script(tmp_path, """
        pyddl.init(timeout_s=60)
        if pyddl.rank() == 2:
            print("rank 2: bad input", file=sys.stderr, flush=True)
            sys.exit(2)
        pyddl.allreduce(torch.ones(1))
    """)
    with EmulatedCluster(2) as cluster:
        proc = subprocess.run(PYDDL + _hosts_args(cluster, 2, script), cwd=tmp_path, capture_output=True,
                              text=True, timeout=100, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert "rank 2 (local rank 0" in proc.stderr and "exited with code 2" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_a_rank_killed_at_step_k_is_named_and_every_server_stops(tmp_path):
    k = 3
    script = _script(tmp_path, f"""
        pyddl.init(timeout_s=60)
        r = pyddl.rank()
        for step in range(1000):
            if r == 3 and step == {k}:
                print("REPORT " + json.dumps(dict(killed_at=time.time())), flush=True)
                print("rank 3: injected fault at step {k}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            pyddl.allreduce(torch.ones(1000))
            time.sleep(0.05)
    """)
    with EmulatedCluster(2) as cluster:
        proc = subprocess.run(PYDDL + _hosts_args(cluster, 2, script), cwd=tmp_path, capture_output=True,
                              text=True, timeout=100, env=_env())
        ended = time.time()
        left = _pids_in(cluster)
    err = proc.stderr
    assert proc.returncode == 1, err
    killed_at = _reports(proc.stdout)[3][0]["killed_at"]
    # Nothing hangs: every other rank stopped well before the 60 s collective timeout.
    assert ended - killed_at < 10, (ended - killed_at, err)
    assert left == []
    s1 = cluster.servers[1].address
    assert f"pyddl run: server {s1} (node 1, ranks 2-3): its launcher exited with code 1" in err
    assert "rank 3 (local rank 1" in err and "was killed by signal SIGKILL" in err
    assert f"rank 3: injected fault at step {k}" in err  # the tail of its stderr
    assert f"stopped the other servers: {cluster.servers[0].address} (node 0)" in err


@pytest.mark.timeout(150)
def test_cut_link_times_out_naming_the_missing_ranks(tmp_path):
    script = _script(tmp_path, """
        pyddl.init()
        for step in range(100000):
            pyddl.allreduce(torch.ones(1000))
            if pyddl.rank() == 0:
                print(f"REPORT {json.dumps(dict(step=step))}", flush=True)
            time.sleep(0.1)
    """)
    with EmulatedCluster(2) as cluster:
        launcher = subprocess.Popen(PYDDL + _hosts_args(cluster, 2, "--timeout", "5", script), cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                line = launcher.stdout.readline()
                if not line or any(rep[0]["step"] >= 3 for rep in _reports(line).values()):
                    break
            # The bridge side of server 1's link: server 1 is cut off from server 0.
            subprocess.run(["ip", "link", "set", cluster.servers[1].host_link, "down"], check=True)
            cut = time.monotonic()
            _, err = launcher.communicate(timeout=60)
            elapsed = time.monotonic() - cut
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    assert launcher.returncode == 1, err
    # The ranks of server 0 waited --timeout 5 s for ranks 2 and 3, named them, and the
    # driver stopped server 1.
    assert "timed out after 5 s" in err, err
    assert re.search(r"(ranks that did not arrive: rank 2 .*rank 3|no heartbeat from ranks 2,3)", err), err
    assert f"server {cluster.servers[0].address} (node 0, ranks 0-1): its launcher exited with code 1" in err
    assert elapsed < 40, elapsed


# The two-line restart pattern of docs/launch.md: load the checkpoint if there is one, save
# one each epoch. Rank 3 dies once, in epoch 2; the restarted job must end exactly where an
# uninterrupted one does: w_{e+1} = w_e / 2 + sum over ranks of (r + 1) * (e + 1).
_RESTARTABLE = """
    ckpt = "ckpt.pt"
    pyddl.init()
    r = pyddl.rank()
    state = torch.load(ckpt) if os.path.exists(ckpt) else {"epoch": 0, "w": torch.zeros(3)}
    print("REPORT " + json.dumps(dict(start=state["epoch"], restart=os.environ.get("PYDDL_RESTART_COUNT"))), flush=True)
    w = state["w"]
    for epoch in range(state["epoch"], 4):
        if r == 3 and epoch == 2 and not os.path.exists("killed"):
            open("killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        w = w / 2 + pyddl.allreduce(torch.full((3,), float((r + 1) * (epoch + 1))))
        if r == 0:
            torch.save({"epoch": epoch + 1, "w": w}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)  # a kill mid-save leaves the previous checkpoint
        pyddl.barrier()
    print("REPORT " + json.dumps(dict(w=w.tolist())), flush=True)
    pyddl.shutdown()
"""


@pytest.mark.timeout(200)
def test_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    w = 0.0
    for epoch in range(4):
        w = w / 2 + sum((r + 1) * (epoch + 1) for r in range(4))
    with EmulatedCluster(2) as cluster:
        script = _script(tmp_path, _RESTARTABLE)
        proc = subprocess.run(PYDDL + _hosts_args(cluster, 2, "--max-restarts", "1", script), cwd=tmp_path,
                              capture_output=True, text=True, timeout=150, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "rank 3 (local rank 1" in proc.stderr and "killed by signal SIGKILL" in proc.stderr
    assert "restarting every server's workers (restart 1 of 1)" in proc.stderr
    rep = _reports(proc.stdout)
    starts = sorted((x["start"], x["restart"]) for r in rep for x in rep[r] if "start" in x)
    # First attempt from scratch; the restart (PYDDL_RESTART_COUNT=1) from epoch 2's checkpoint.
    assert starts == [(0, None)] * 4 + [(2, "1")] * 4
    finals = [x["w"] for r in rep for x in rep[r] if "w" in x]
    assert len(finals) == 4 and all(f == [w] * 3 for f in finals), (finals, w)


@pytest.mark.timeout(200)
def test_elastic_c10d_servers_restart_together(tmp_path):
    # torchrun's way, one `pyddl run --nnodes 2:2` per server: the server whose rank died
    # restarts its workers, the other sees it rejoin the rendezvous and restarts its own.
    w = 0.0
    for epoch in range(4):
        w = w / 2 + sum((r + 1) * (epoch + 1) for r in range(4))
    script = _script(tmp_path, _RESTARTABLE)
    with EmulatedCluster(2) as cluster:
        addr = cluster.servers[0].address
        agents = [subprocess.Popen(
            ["ip", "netns", "exec", s.netns, *PYDDL, "run", "--nnodes", "2:2", "--master-addr", addr,
             "--master-port", "29400", "-np", "2", "--network-interface", "eth0", "--max-restarts", "1", script],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
            for s in cluster.servers]
        outs = [a.communicate(timeout=150) for a in agents]
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, err
    rep = _reports("".join(out for out, _ in outs))
    assert sorted(x["start"] for r in rep for x in rep[r] if "start" in x) == [0] * 4 + [2] * 4
    finals = [x["w"] for r in rep for x in rep[r] if "w" in x]
    assert len(finals) == 4 and all(f == [w] * 3 for f in finals), (finals, w)


@pytest.mark.timeout(120)
def test_sigterm_to_the_driver_stops_every_server(tmp_path):
    script = _script(tmp_path, """
        pyddl.init()
        print("REPORT " + json.dumps(dict(up=True)), flush=True)
        time.sleep(90)
    """)
    with EmulatedCluster(2) as cluster:
        driver = subprocess.Popen(PYDDL + _hosts_args(cluster, 1, script), cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_env())
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 2 and time.monotonic() < deadline:
            seen += len(_reports(driver.stdout.readline()))
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=30)
        left = _pids_in(cluster)
    assert seen == 2, err
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM; every server's workers stopped" in err
    assert left == []


def _kill_a_train_worker(netns):
    for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"pyddl.train.worker" in fh.read():
                    os.kill(int(pid), signal.SIGKILL)
                    return True
        except (OSError, ValueError):
            continue
    return False


def _kill_once_saved(checkpoint, netns, driver, killed):
    """Kill the train worker in ``netns`` as soon as ``checkpoint`` exists; record whether it was found."""
    while driver.poll() is None and not checkpoint.exists():
        time.sleep(0.02)
    killed.append(driver.poll() is None and _kill_a_train_worker(netns))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_pyddl_train_on_two_servers_resumes_after_a_restart(tmp_path):
    # That the resumed run ends where an unstopped one would is checked on one server
    # (tests/cli/test_run_cli.py); here, that every server restarts and resumes.
    flags = ["train", "--epochs", "2", "--batch-size", "16", "--seed", "1"]
    with EmulatedCluster(2) as cluster:
        hosts = _hosts_args(cluster, 1)[1:]  # -np 2 -H ... --launcher ... --network-interface eth0
        driver = subprocess.Popen(PYDDL + [*flags, *hosts, "--max-restarts", "1", "--out", str(tmp_path / "a")],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        # Rank 0 prints an epoch's line before it writes the checkpoint, and the next line
        # comes only at the end of the following epoch, so the checkpoint is watched for on
        # its own thread rather than on each line of output.
        output, killed = [], []
        watcher = threading.Thread(target=_kill_once_saved, daemon=True, args=(
            tmp_path / "a" / "checkpoints" / "ckpt-000001.pt", cluster.servers[1].netns, driver, killed))
        watcher.start()
        try:
            output.extend(driver.stdout)
            driver.wait(timeout=150)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
            watcher.join()
    text = "".join(output)
    assert killed == [True] and driver.returncode == 0, text
    assert "restarting every server's workers (restart 1 of 1)" in text
    assert f"resuming from {tmp_path / 'a' / 'checkpoints' / 'ckpt-000001.pt'} at epoch 1" in text, text
    assert text.count("epoch 1/2") == 1 and text.count("epoch 2/2") == 1, text
