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


# ---- the published setups and their sources (issue 22) -------------------------------------


def test_published_setups_ship_with_their_anchors():
    assert {"powerai-ddl-2017", "fb-big-basin-2017"} <= set(shipped_clusters())
    ddl = load_cluster("powerai-ddl-2017")
    assert [(a.model, a.batch, a.num_classes, a.gpus, a.efficiency) for a in ddl.anchors] == [
        ("resnet50", 32, 1000, 256, 0.95), ("resnet101", 20, 21841, 256, 0.88)]
    assert ddl.anchors[1].batch * ddl.anchors[1].gpus == 5120  # the published global batch
    fb = load_cluster("fb-big-basin-2017")
    assert (fb.gpus_per_server, fb.servers) == (8, 32)
    assert fb.fabric(256).levels[1].link_Bps == pytest.approx(50e9 / 8)
    (goyal,) = fb.anchors
    assert (goyal.gpus, goyal.baseline_gpus, goyal.algorithm, goyal.efficiency) == (256, 8, "hd", 0.90)
    for c in (ddl, fb):
        assert c.stack.step_cv > 0 and c.stack.bucket_mb == 0 and c.stack.overlap


@pytest.mark.parametrize("name", shipped_clusters())
def test_every_number_in_a_shipped_cluster_has_a_source_comment(name):
    # A number's source is a comment on its line or in the block of lines just above it (up to
    # a blank line or a table header), as the files are written; the top-level numbers before
    # the first table (servers, GPUs per server) are the file's opening comment's.
    from importlib import resources

    lines = resources.files("pyddl.sim").joinpath("clusters", f"{name}.toml").read_text().splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("["))
    assert lines[0].startswith("# ")
    numbers = 0
    for i, line in enumerate(lines[first_table:], first_table):
        key, _, value = line.partition("=")
        if not value.strip() or not value.strip()[0] in "-.0123456789":
            continue
        numbers += 1
        block, j = [line], i - 1
        while j >= 0 and lines[j].strip() and not lines[j].startswith("["):
            block.append(lines[j])
            j -= 1
        assert any("#" in b for b in block), f"{name}.toml: {key.strip()} has no source comment"
    assert numbers >= 10


TOP = THREE_LEVELS.split("[[levels]]")[0]

BAD_VALUES = [
    (lambda s: TOP + "levels = [1, 2]\n", "levels must be [[levels]] tables"),
    (lambda s: "device = 5\n" + s, "[device] must be a table of keys, got 5"),
    (lambda s: s.replace("link_gbps = 25.0", "link_gbps = 1e-300"),
     "link_gbps must be a number from 0.001 to 1e+06, got 1e-300"),
    (lambda s: s.replace("link_gbps = 25.0", 'link_gbps = "fast"'), "link_gbps must be a number from"),
    (lambda s: s.replace("servers = 12", "servers = 12.5"), "servers must be an integer"),
    (lambda s: s.replace('name = "racks"', "name = 3"), "name must be a string, got 3"),
    (lambda s: 'multiring_pipeline = "yes"\n' + s, "multiring_pipeline must be true or false, got 'yes'"),
    (lambda s: s + "[stack]\nstep_cv = 2.0\n", "[stack]: step_cv must be a number from 0 to 1, got 2.0"),
    (lambda s: s + "[stack]\nfusion = 1\n", "[stack]: unknown key(s) fusion"),
    (lambda s: s + '[[anchors]]\nname = "x"\n', "[[anchors]] #1: missing key(s)"),
    (lambda s: s + '[[anchors]]\nname = "x"\nsource = "y"\nefficiency = 0.9\nmodel = "resnet50"\nbatch = 32\n'
                   'gpus = 8\nalgorithm = "ring2"\n', "algorithm must be one of native, multiring"),
]


@pytest.mark.parametrize("edit, text", BAD_VALUES)
def test_wrong_types_and_absurd_values_name_the_file_and_key(tmp_path, edit, text):
    path = tmp_path / "bad.toml"
    path.write_text(edit(THREE_LEVELS))
    with pytest.raises(ValueError) as err:
        load_cluster(str(path))
    msg = str(err.value)
    assert text in msg and str(path) in msg and "\n" not in msg


def test_a_directory_is_not_a_cluster_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_cluster(str(tmp_path))
