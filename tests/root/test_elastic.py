"""Horovod elastic on `pyddl run --nnodes MIN:MAX` (issue 19 point 5), on emulated servers.

One `pyddl run --nnodes 2:3 -np 1` per server (a network namespace, pyddl.launch.emulate),
server 0 hosting the c10d rendezvous, running tests/elastic_job.py (TorchState,
DistributedOptimizer, ElasticSampler, a reset callback that re-scales the learning rate).
A server is killed (SIGKILL to its launcher's process group) or added mid-epoch, and the job
must finish from its last commit at the new size. Needs root and iproute2; skipped otherwise.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyddl.launch.emulate import EmulatedCluster

PYDDL = [sys.executable, "-m", "pyddl.cli.main"]
JOB = os.path.join(os.path.dirname(os.path.dirname(__file__)), "elastic_job.py")
_CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
pytestmark = [
    pytest.mark.root,
    pytest.mark.cli,
    pytest.mark.skipif(not _CAN_EMULATE, reason="needs root and iproute2 (ip, tc): it creates network namespaces"),
]
# A dead server leaves the rendezvous after 1 s x 3 keep-alives, and a new round waits 1 s
# for more servers once MIN are there (torchrun's defaults: 5 s x 3 and 30 s).
_RDZV = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"


def _env(step_sleep_s):
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME", "PYDDL_TOPOLOGY", "PYDDL_RESTART_COUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["STEP_SLEEP_S"] = str(step_sleep_s)
    return env


def _agent(cluster, server, out, step_sleep_s=0.3):
    return subprocess.Popen(
        ["ip", "netns", "exec", server.netns, *PYDDL, "run", "--nnodes", "2:3", "--master-addr",
         cluster.servers[0].address, "--master-port", "29400", "-np", "1", "--network-interface", "eth0",
         "--max-restarts", "2", "--rdzv-conf", _RDZV, JOB, str(out)],
        cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(step_sleep_s),
        start_new_session=True)


def _reports(text):
    return [json.loads(m.group(1)) for m in re.finditer(r"^\[rank\d+\] REPORT (.*)$", text, re.M)]


def _wait_for(agent, seen, pred, timeout_s=60):
    """Read `agent`'s output into `seen` until a report satisfies `pred`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = agent.stdout.readline()
        if not line:
            break
        seen.append(line)
        if any(pred(r) for r in _reports(line)):
            return
    raise AssertionError("never saw the report waited for:\n" + "".join(seen))


def _two_workers_from(start):
    """elastic_job.py's training on 2 workers from `start`, each step's gradient the mean of
    the two workers' (DistributedOptimizer's average), without pyddl."""
    from pyddl.torch.elastic.sampler import shard

    n, batch, epochs = 48, 2, 3  # elastic_job.py's SAMPLES, BATCH, EPOCHS; its sampler's seed is 7
    x = torch.linspace(-1, 1, n * 3, dtype=torch.float64).reshape(n, 3)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]], dtype=torch.float64) + 0.25
    model = torch.nn.Linear(3, 1).double()
    model.load_state_dict(start["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.load_state_dict(start["optimizer"])
    epoch, processed = start["sampler"]["epoch"], start["sampler"]["processed_num"]
    while epoch < epochs:
        shards = [shard(n, processed, epoch, 7, True, r, 2) for r in range(2)]
        for i in range(0, len(shards[0]), batch):
            grads = []
            for rows in (s[i:i + batch] for s in shards):
                model.zero_grad()
                torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for p, g0, g1 in zip(model.parameters(), *grads):
                p.grad = (g0 + g1) / 2
            optimizer.step()
        epoch, processed = epoch + 1, 0
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _finish(agents, timeout_s=90):
    outs = []
    for a in agents:
        out, err = a.communicate(timeout=timeout_s)
        outs.append((out, err))
    return outs


def _stop(agents):
    for a in agents:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()


@pytest.mark.timeout(150)
def test_a_server_killed_mid_epoch_the_job_ends_on_two_as_a_two_worker_run_from_its_commit(tmp_path):
    with EmulatedCluster(3) as cluster:
        agents = [_agent(cluster, s, tmp_path) for s in cluster.servers]
        try:
            seen = []
            _wait_for(agents[0], seen, lambda r: r.get("size") == 3 and r.get("commit", 0) >= 2)
            os.killpg(agents[2].pid, signal.SIGKILL)
            killed = time.monotonic()
            _wait_for(agents[0], seen, lambda r: r.get("size") == 2 and "resumed" in r)
            recovery_s = time.monotonic() - killed
            outs = _finish(agents[:2])
        finally:
            _stop(agents)
    first = "".join(seen) + outs[0][0]
    for a, (_, err) in zip(agents[:2], outs):
        assert a.returncode == 0, err
    assert "pyddl.torch.elastic: this worker stops on HorovodInternalError" in "".join(e for _, e in outs)
    reports = _reports(first + outs[1][0])
    resumed = [r for r in reports if r.get("resumed") and r["size"] == 2]
    assert len(resumed) == 2, reports
    # They resumed from the newest commit made at size 3, with exactly its parameters.
    made = {r["commit"]: r["w"] for r in reports if "commit" in r and r["size"] == 3}
    newest = max(made)
    assert {r["resumed"] for r in resumed} == {newest}
    assert all(r["w"] == made[newest] for r in resumed)
    assert resumed[0]["epoch"] == 0 and 0 < resumed[0]["processed"] < 48  # mid-epoch: the sampler re-shards
    finals = [r["final"] for r in reports if "final" in r]
    assert len(finals) == 2 and finals[0] == finals[1]
    # The reference: what 2 workers compute from the state they resumed from, by hand.
    expected = _two_workers_from(torch.load(tmp_path / "resumed-2.pt", weights_only=False))
    assert torch.allclose(torch.tensor(finals[0], dtype=torch.float64), expected, rtol=0, atol=1e-12), (finals, expected)
    print(f"recovery: {recovery_s:.1f} s from the kill to the resumed workers' first report")


@pytest.mark.timeout(150)
def test_a_server_added_to_a_running_job_joins_at_size_three(tmp_path):
    with EmulatedCluster(3) as cluster:
        agents = [_agent(cluster, s, tmp_path) for s in cluster.servers[:2]]
        try:
            seen = []
            _wait_for(agents[0], seen, lambda r: r.get("size") == 2 and r.get("commit", 0) >= 3)
            agents.append(_agent(cluster, cluster.servers[2], tmp_path))
            added = time.monotonic()
            _wait_for(agents[0], seen, lambda r: r.get("size") == 3 and "resumed" in r)
            join_s = time.monotonic() - added
            outs = _finish(agents)
        finally:
            _stop(agents)
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, err
    reports = _reports("".join(seen) + "".join(out for out, _ in outs))
    made = {r["commit"]: r["w"] for r in reports if "commit" in r and r["size"] == 2}
    resumed = [r for r in reports if "resumed" in r and r["size"] == 3]
    assert len(resumed) == 3 and {r["resumed"] for r in resumed} == {max(made)}, reports
    assert all(r["w"] == made[max(made)] for r in resumed)  # the new server got the commit too
    finals = [r["final"] for r in reports if "final" in r]
    assert len(finals) == 3 and all(f == finals[0] for f in finals) and all(r["size"] == 3 for r in reports if "final" in r)
    print(f"join: {join_s:.1f} s from starting the third server to the resumed workers' first report")
