"""Multi-server launch, pure parts: host lists, rank placement, and the exact command per server."""

import argparse
import re
import shlex

import pytest

from pyddl.launch.hosts import (
    Host, check_command, forwarded_env, launcher_words, parse_hostfile, parse_hosts, place_ranks,
)
from pyddl.launch.config import RunConfig


def test_parse_hosts_and_bare_host():
    assert parse_hosts("host1:4,host2:4") == (Host("host1", 4), Host("host2", 4))
    assert parse_hosts("a, b:2,") == (Host("a", 1), Host("b", 2))
    assert parse_hosts("[fe80::1]:2,10.0.0.2:3") == (Host("[fe80::1]", 2), Host("10.0.0.2", 3))


@pytest.mark.parametrize("spec, text", [
    ("a:x", "slots must be a whole number"),
    ("a:0", "has 0 slots"),
    ("a:2,a:2", "listed twice"),
    ("", "no host given"),
    ("a b:2", "not a host name"),
])
def test_bad_host_lists_say_how_to_fix(spec, text):
    with pytest.raises(ValueError, match=text):
        parse_hosts(spec)


@pytest.mark.parametrize("name", [
    "-Fevil.conf", "-oProxyCommand=sh", "host;rm", "a..b", "-h", "a_b", "user@-x", "-u@host", "[::g]",
    "x" * 64, "a@b@c", "$(id)", "host\\name",
])
def test_only_host_names_pass(name):
    # Issue 23 point 2: a name that ssh could read as an option, or a shell as code, is refused
    # in -H and in a hostfile alike.
    with pytest.raises(ValueError, match="is not a host name or address"):
        parse_hosts(f"{name}:1")
    with pytest.raises(ValueError, match=r"hf:1: .* is not a host name or address"):
        parse_hostfile(f"{name} slots=1", "hf")


def test_rfc1123_names_addresses_and_users_pass():
    names = ["node1", "n-1.rack2.example.com", "10.0.0.2", "[fe80::1]", "[::1]", "[fe80::1%eth0]",
             "alice@node1", "bob.smith@10.0.0.2", "9node", "a" * 63]
    assert [h.name for h in parse_hosts(",".join(f"{n}:2" for n in names))] == names
    assert [h.name for h in parse_hostfile("alice@node1 slots=2\n[fe80::1] slots=2\n")] == ["alice@node1", "[fe80::1]"]


def test_user_at_host_reaches_ssh_after_its_options_and_the_store_without_user():
    from pyddl.launch.remote import server_commands

    cfg = RunConfig(nproc=2, command=("j.py",), hosts=parse_hosts("alice@n1,n2"))
    cmds = server_commands(cfg, place_ranks(cfg.hosts, 2), environ={}, cwd="/", python="py")
    assert cmds[0][:5] == ["ssh", "-o", "BatchMode=yes", "--", "alice@n1"]
    assert "--master-addr n1 " in cmds[1][-1]


def test_hostfile_comments_blank_lines_and_bare_hosts():
    text = "# the rack\n\nnode1 slots=4\nnode2 slots = 4   # spare PSU\nnode3\n"
    assert parse_hostfile(text) == (Host("node1", 4), Host("node2", 4), Host("node3", 1))
    with pytest.raises(ValueError, match=r"hf:2: cannot read 'node2 cpus=4'"):
        parse_hostfile("node1 slots=2\nnode2 cpus=4\n", "hf")
    with pytest.raises(ValueError, match=r"hf:1: slots='four'"):
        parse_hostfile("node1 slots=four", "hf")


def test_ranks_fill_servers_in_order():
    hosts = parse_hosts("a:4,b:4,c:4")
    got = [(p.host, p.node, p.nproc, list(p.ranks)) for p in place_ranks(hosts, 8)]
    assert got == [("a", 0, 4, [0, 1, 2, 3]), ("b", 1, 4, [4, 5, 6, 7])]  # c gets no rank: unused
    with pytest.raises(ValueError, match="-np 13 is more than the 12 slots of a:4,b:4,c:4; pass -np 12"):
        place_ranks(hosts, 13)
    with pytest.raises(ValueError, match=r"puts 4, 2 ranks .* pass -np 8 or -H a:3,b:3"):
        place_ranks(hosts, 6)


def test_launcher_template_and_reachability_command():
    assert launcher_words("ssh -o BatchMode=yes", "h1", 0) == ["ssh", "-o", "BatchMode=yes", "--", "h1"]
    assert launcher_words("ip netns exec pyddl0s{node}", "10.213.0.3", 1) == ["ip", "netns", "exec", "pyddl0s1"]
    assert launcher_words("ssh -p 2222 {host}", "h1", 0) == ["ssh", "-p", "2222", "h1"]
    assert check_command("ssh -o BatchMode=yes", "h1", 0) == ["ssh", "-o", "BatchMode=yes", "--", "h1", "true"]
    with pytest.raises(ValueError, match=r"placeholder\(s\) \['rank'\]"):
        launcher_words("ssh {rank}", "h", 0)
    with pytest.raises(ValueError, match="--launcher is empty"):
        launcher_words(" ", "h", 0)


def _commands(launcher, environ=None, **kw):
    from pyddl.launch.remote import server_commands

    cfg = RunConfig(nproc=4, command=("train.py", "--lr", "0.1 x"), hosts=parse_hosts("n1:2,n2:2"),
                    launcher=launcher, **kw)
    return server_commands(cfg, place_ranks(cfg.hosts, cfg.nproc), environ=environ or {}, cwd="/w d",
                           python="/venv/bin/python")


def test_exact_remote_commands_over_ssh(monkeypatch):
    monkeypatch.setenv("PYDDL_CHECK", "0")  # a setting exported here reaches every server
    cmds = _commands("ssh -o BatchMode=yes", environ={"PYDDL_CHECK": "0", "HOME": "/root"},
                     allreduce="multiring", timeout_s=30.0, master_port=29600, network_interface="ens5")
    env = ("GLOO_SOCKET_IFNAME=ens5 NCCL_SOCKET_IFNAME=ens5 PYDDL_ALLREDUCE=multiring PYDDL_CHECK=0 "
           "PYDDL_CHUNK_BYTES=2097152 PYDDL_COMPRESSION=none PYDDL_TIMEOUT=30.0")
    for node, argv in enumerate(cmds):
        # ssh passes one command line to the remote login shell.
        assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "--", f"n{node + 1}"] and len(argv) == 6
        assert argv[5] == (
            f"cd '/w d' && exec env {env} /venv/bin/python -u -m pyddl.cli.main run --nnodes 2 "
            f"--node-rank {node} --master-addr n1 --master-port 29600 -np 2 --exit-with-stdin -- "
            f"train.py --lr '0.1 x'")
        words = shlex.split(argv[5])  # what the remote shell runs
        assert words[-4:] == ["--", "train.py", "--lr", "0.1 x"] and "HOME=/root" not in words


def test_exact_remote_commands_through_an_exec_launcher():
    cmds = _commands("ip netns exec pyddl0s{node}")
    settings = "PYDDL_ALLREDUCE=native PYDDL_CHECK=1 PYDDL_CHUNK_BYTES=2097152 PYDDL_COMPRESSION=none PYDDL_TIMEOUT=300.0"
    for node, argv in enumerate(cmds):
        assert argv[:6] == ["ip", "netns", "exec", f"pyddl0s{node}", "sh", "-c"] and len(argv) == 7
        assert argv[6] == (
            f"cd '/w d' && exec env {settings} /venv/bin/python -u -m pyddl.cli.main run --nnodes 2 --node-rank {node} "
            f"--master-addr n1 --master-port 29500 -np 2 --exit-with-stdin -- train.py --lr '0.1 x'")


def test_environment_forwarding_and_restart_count():
    assert forwarded_env({"PYDDL_TOPOLOGY": "4x2", "PATH": "/bin"}, {"PYDDL_TOPOLOGY": "2x4"}) == {"PYDDL_TOPOLOGY": "2x4"}
    from pyddl.launch.remote import RESTART_COUNT_ENV, server_commands

    cfg = RunConfig(nproc=2, command=("j.py",), hosts=parse_hosts("a,b"), launcher="env")
    cmd = server_commands(cfg, place_ranks(cfg.hosts, 2), restart=1, environ={}, cwd="/", python="py")[1]
    assert f" {RESTART_COUNT_ENV}=1 " in cmd[-1]
    cmd = server_commands(cfg, place_ranks(cfg.hosts, 2), restart=1, reason="rank 1 was killed by signal SIGKILL",
                          environ={}, cwd="/", python="py")[1]
    assert f" {RESTART_COUNT_ENV}=1 'PYDDL_RESTART_REASON=rank 1 was killed by signal SIGKILL' " in cmd[-1]


def _args(argv):
    from pyddl.cli.run import add_job_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_job_flags(parser)
    return config_from_args(parser.parse_args(argv), ("j.py",))


def test_cli_flags_make_the_config(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=2\nb slots=2\n")
    cfg = _args(["--hostfile", str(hf), "--launcher", "ssh -p 22"])
    assert cfg.nproc == 4 and [h.name for h in cfg.hosts] == ["a", "b"] and cfg.launcher == "ssh -p 22"
    cfg = _args(["-np", "2", "--nnodes", "1:3", "--master-addr", "10.0.0.1"])
    assert (cfg.nnodes, cfg.max_nnodes, cfg.elastic) == (1, 3, True)
    cfg = _args(["-np", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "1234"])
    assert (cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port, cfg.elastic) == (2, 1, "10.0.0.1", 1234, False)
    with pytest.raises(ValueError, match="No such file"):
        _args(["--hostfile", str(tmp_path / "missing")])


@pytest.mark.parametrize("kw, text", [
    (dict(nnodes=2), "needs --master-addr"),
    (dict(nnodes=2, master_addr="a"), "needs --node-rank from 0 to 1"),
    (dict(nnodes=2, master_addr="a", node_rank=2), "needs --node-rank from 0 to 1"),
    (dict(nnodes=2, max_nnodes=1, master_addr="a"), "MIN must not exceed MAX"),
    (dict(nnodes=1, max_nnodes=2, master_addr="a", node_rank=0), "does not apply to --nnodes MIN:MAX"),
    (dict(nnodes=2, master_addr="a", node_rank=0, max_restarts=1), "restart this server's workers alone"),
    (dict(hosts=(Host("a", 2),), nnodes=2), "drop --nnodes"),
    (dict(hosts=(Host("a", 2),), emulate_nodes=2), "pick one"),
    (dict(node_rank=1), "needs --nnodes N > 1"),
    (dict(emulate_nodes=2, network_interface="ens5"), "every emulated server's link is eth0"),
])
def test_bad_server_flags_are_named(kw, text):
    with pytest.raises(ValueError, match=text):
        RunConfig(nproc=2, command=("j.py",), **kw)


def test_network_interface_sets_the_data_path_only():
    env = RunConfig(nproc=2, command=("j.py",), network_interface="ib0").worker_env()
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert "MASTER_ADDR" not in env


@pytest.mark.timeout(10)
def test_rack_flags_reach_the_config_and_the_workers():
    from pyddl.config import PYDDL_RACK_GBPS, PYDDL_RACKS

    cfg = _args(["-np", "8", "--emulate-nodes", "4", "--emulate-racks", "2", "--emulate-rack-gbps", "0.5"])
    assert (cfg.emulate_nodes, cfg.emulate_racks, cfg.emulate_rack_gbps) == (4, 2, 0.5)
    env = cfg.worker_env()
    assert (env[PYDDL_RACKS], float(env[PYDDL_RACK_GBPS])) == ("2", 0.5)
    # Racks without a rate: unlimited uplinks, and the workers are told no rate.
    env = _args(["-np", "8", "--emulate-nodes", "4", "--emulate-racks", "2"]).worker_env()
    assert env[PYDDL_RACKS] == "2" and PYDDL_RACK_GBPS not in env
    assert PYDDL_RACKS not in _args(["-np", "8", "--emulate-nodes", "4"]).worker_env()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, text", [
    (["--emulate-nodes", "2", "--emulate-rack-gbps", "1"],
     "--emulate-rack-gbps limits the uplinks between racks; add --emulate-racks R (R divides --emulate-nodes 2)"),
    (["--emulate-racks", "2"], "--emulate-racks and --emulate-rack-gbps describe an emulated cluster; add "
                               "--emulate-nodes M"),
    (["--emulate-rack-gbps", "1"], "add --emulate-nodes M"),
    (["--emulate-nodes", "4", "--emulate-racks", "0"], "--emulate-racks must be a positive number of racks, got 0"),
    (["--emulate-nodes", "3", "--emulate-racks", "2"],
     "--emulate-nodes 3 servers do not split evenly over --emulate-racks 2 racks; pass a multiple of 2 to "
     "--emulate-nodes or a divisor of 3 to --emulate-racks"),
    (["--emulate-nodes", "2", "--emulate-racks", "4"], "--emulate-nodes 2 servers do not split evenly over "
                                                        "--emulate-racks 4 racks"),
    (["--emulate-nodes", "4", "--emulate-racks", "2", "--emulate-rack-gbps", "0"],
     "--emulate-rack-gbps must be a positive rate in Gbit/s, got 0.0"),
])
def test_bad_rack_flags_are_one_line_and_exit_2(argv, text, capsys):
    from pyddl.cli.main import main

    # 12 workers split over 2, 3 and 4 servers: only the rack flags are wrong. The check runs
    # before anything starts (no root, no worker, no namespace needed to see it).
    assert main(["run", "-np", "12", *argv, "python", "-c", "pass"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyddl run: ") and err.count("\n") == 1 and text in err, err
    with pytest.raises(ValueError, match=re.escape(text)):
        _args(["-np", "12", *argv])
