"""Cluster descriptions: shipped files, layout of a job, errors, TOML round trip."""

import pytest

from pyddl.sim.cluster import cluster_to_toml, load_cluster, shipped_clusters


def test_shipped_clusters_load_with_their_documented_numbers():
    assert {"powerai-ddl-2017", "dgx-a100"} <= set(shipped_clusters())
    ddl = load_cluster("powerai-ddl-2017")
    assert (ddl.gpus_per_server, ddl.servers, ddl.max_gpus) == (4, 64, 256)
    f = ddl.fabric(256)
    assert f.dims == (4, 64)
    assert f.levels[1].link_Bps == pytest.approx(100e9 / 8)  # EDR: 100 Gbit/s
    assert f.levels[1].latency_s == pytest.approx((1.0 + 5.0) * 1e-6)  # wire + per-step overhead
    assert f.gamma_s_per_byte == pytest.approx(3 / 732e9)
    dgx = load_cluster("dgx-a100")
    assert dgx.fabric(256).dims == (8, 32) and dgx.fabric(256).levels[1].links == 8


def test_dims_for_a_job():
    ddl = load_cluster("powerai-ddl-2017")
    assert ddl.dims_for(1) == (1, 1)
    assert ddl.dims_for(4) == (4, 1)
    assert ddl.dims_for(32) == (4, 8)


@pytest.mark.parametrize("gpus, text", [
    (6, "not a multiple of the 4 GPUs per server"),
    (512, "more than cluster 'powerai-ddl-2017' has"),
    (0, "positive integer"),
])
def test_impossible_gpu_counts_are_rejected(gpus, text):
    with pytest.raises(ValueError, match=text):
        load_cluster("powerai-ddl-2017").dims_for(gpus)


def test_ring_max_splits_the_rings_between_servers_over_the_same_links():
    f = load_cluster("powerai-ddl-2017").fabric(256, ring_max=16)
    assert f.dims == (4, 16, 4)
    assert f.levels[1] == f.levels[2] != f.levels[0]
    assert load_cluster("powerai-ddl-2017").fabric(256, ring_max=8).dims == (4, 8, 8)


THREE_LEVELS = """
name = "racks"
gpus_per_server = 2
servers = 12
[[levels]]
name = "pcie"
link_gbps = 100.0
latency_us = 2.0
[[levels]]
name = "tor"
link_gbps = 25.0
latency_us = 3.0
size = 4
[[levels]]
name = "spine"
link_gbps = 10.0
latency_us = 5.0
"""


COMM_CPU = """
[comm_cpu.native]
per_call_us = 300.0
per_byte_ns = 1.5

[comm_cpu.multiring]
per_call_us = 900.0
per_byte_ns = 2.5
"""


def test_intermediate_levels_group_servers(tmp_path):
    path = tmp_path / "racks.toml"
    path.write_text(THREE_LEVELS)
    c = load_cluster(str(path))
    assert c.dims_for(4) == (2, 2, 1)
    assert c.dims_for(24) == (2, 4, 3)
    with pytest.raises(ValueError, match="whole 'tor' groups of 4"):
        c.dims_for(12)
    assert c.device is None and c.gamma_s_per_byte == 0.0
    again = tmp_path / "again.toml"
    again.write_text(cluster_to_toml(c, "round trip"))
    assert load_cluster(str(again)) == c
    # A CPU bed's host costs (multiring stages; communication CPU per algorithm) round-trip too.
    path.write_text("multiring_stage_us = 250.0\n" + THREE_LEVELS + COMM_CPU)
    cpu = load_cluster(str(path))
    assert cpu.fabric(4).stage_s == pytest.approx(250e-6)
    assert cpu.comm_cpu["native"].seconds(2**20) == pytest.approx(300e-6 + 2**20 * 1.5e-9)
    assert set(cpu.comm_cpu) == {"native", "multiring"}
    again.write_text(cluster_to_toml(cpu))
    assert load_cluster(str(again)) == cpu


def test_round_trip_of_a_shipped_cluster(tmp_path):
    c = load_cluster("powerai-ddl-2017")
    path = tmp_path / "copy.toml"
    path.write_text(cluster_to_toml(c))
    assert load_cluster(str(path)) == c


@pytest.mark.parametrize("edit, text", [
    (lambda s: s.replace('name = "pcie"', 'name = "pcie"\nspeed = 3'), "unknown key"),
    (lambda s: s.replace("link_gbps = 25.0\n", ""), "missing key"),
    (lambda s: s.replace("latency_us = 5.0", "latency_us = -5.0"), "latency_us must be"),
    (lambda s: s.replace("size = 4\n", ""), "size"),
    (lambda s: s.replace("servers = 12", "servers = 10"), "whole groups of 4"),
    (lambda s: s + "[[levels]\n", "not valid TOML"),
    (lambda s: s + COMM_CPU.replace("comm_cpu.multiring", "comm_cpu.tree"), r"\[comm_cpu.native\] and"),
    (lambda s: s + COMM_CPU.replace("per_byte_ns = 1.5", "per_byte_ns = -1.5"), "per_byte_ns must be"),
    (lambda s: s + COMM_CPU.replace("per_byte_ns = 1.5\n", ""), "missing key"),
])
def test_bad_descriptions_say_what_is_wrong(tmp_path, edit, text):
    path = tmp_path / "bad.toml"
    path.write_text(edit(THREE_LEVELS))
    with pytest.raises(ValueError, match=text):
        load_cluster(str(path))


def test_unknown_names_and_paths():
    with pytest.raises(ValueError, match="did you mean powerai-ddl-2017"):
        load_cluster("powerai-ddl-2018")
    with pytest.raises(ValueError, match="does not exist"):
        load_cluster("/nonexistent/cluster.toml")
