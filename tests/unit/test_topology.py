import pytest

from pyddl.topology import Topology, parse_topology, servers_from_keys


def test_coords_and_slices_of_2x3():
    t = Topology((2, 3))
    assert t.size == 6
    assert [t.coords(r) for r in range(6)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert t.slices(0) == [(0, 1), (2, 3), (4, 5)]
    assert t.slices(1) == [(0, 2, 4), (1, 3, 5)]


def test_every_rank_is_in_exactly_one_slice_per_dim():
    t = Topology((2, 2, 2))
    for dim in range(3):
        members = sorted(r for s in t.slices(dim) for r in s)
        assert members == list(range(8))
        assert all(len(s) == 2 for s in t.slices(dim))
    assert t.slice_ranks(5, 2) == (1, 5)


def test_ring_steps_latency_term():
    # ANCHORS.md: 4x16x4 takes 2 x sum(d-1) = 42 steps instead of a flat ring's 2(P-1) = 510.
    assert Topology((4, 16, 4)).ring_steps() == 42
    assert Topology((256,)).ring_steps() == 510


def test_parse_and_squeeze():
    assert parse_topology("4x2", 8).dims == (4, 2)
    assert parse_topology("8").dims == (8,)
    assert parse_topology("1x4x1").squeezed().dims == (4,)
    assert Topology((1, 1)).squeezed().dims == (1,)


@pytest.mark.parametrize(
    "spec, world, fragment",
    [
        ("4x2", 6, "world size 6 does not match topology 4x2 (= 8 ranks)"),
        ("3x2", 8, "run 6 processes"),
        ("4by2", None, "not of the form AxBxC"),
        ("0x4", None, "below 1"),
    ],
)
def test_bad_specs_say_how_to_fix(spec, world, fragment):
    with pytest.raises(ValueError, match=None) as info:
        parse_topology(spec, world)
    assert fragment in str(info.value)


def test_suggests_a_fitting_spec():
    with pytest.raises(ValueError) as info:
        parse_topology("4x2", 12)
    assert "--topology 4x3" in str(info.value)


def test_servers_from_keys():
    assert servers_from_keys(["a", "a", "b", "b", "c", "c"]).dims == (2, 3)
    assert servers_from_keys([0, 1, 2]).dims == (1, 3)


def test_non_contiguous_server_is_an_error():
    with pytest.raises(ValueError) as info:
        servers_from_keys(["a", "b", "a", "b"])
    assert "ranks of server 'a' are [0, 2], not contiguous" in str(info.value)
    assert "--topology" in str(info.value)


def test_uneven_servers_is_an_error():
    with pytest.raises(ValueError) as info:
        servers_from_keys(["a", "a", "a", "b"])
    assert "a: 3, b: 1" in str(info.value)
