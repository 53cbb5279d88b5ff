"""Settings: one frozen dataclass, read from and written to the environment, every bad value
a clear error where it was given."""

import math

import pytest

from pyddl.config import DEFAULT_TIMEOUT_S, Settings
from pyddl.defaults import CHUNK_BYTES


def test_defaults_and_round_trip_through_the_environment():
    s = Settings()
    assert (s.topology, s.allreduce, s.timeout_s, s.chunk_bytes, s.check, s.compression) == (
        None, "native", DEFAULT_TIMEOUT_S, CHUNK_BYTES, True, "none")
    assert s.stall_warn == 60.0 and Settings(timeout_s=10).stall_warn == 5.0
    custom = Settings(topology="2x2", allreduce="MultiRing", timeout_s=12.5, chunk_bytes=4096, check=False,
                      compression="FP16", stall_warn_s=3)
    assert custom.allreduce == "multiring" and custom.compression == "fp16"
    assert Settings.from_env(custom.to_env()) == custom
    assert Settings.from_env(Settings().to_env()) == Settings()


def test_keywords_win_over_the_environment_and_none_leaves_it():
    env = {"PYDDL_ALLREDUCE": "auto", "PYDDL_TIMEOUT": "7", "PYDDL_CHECK": "off", "PYDDL_TOPOLOGY": "4x2"}
    s = Settings.from_env(env, allreduce="native", timeout_s=None)
    assert (s.allreduce, s.timeout_s, s.check, s.topology) == ("native", 7.0, False, "4x2")
    assert Settings.from_env({"PYDDL_CHECK": "0"}).check is False
    assert Settings.from_env({"PYDDL_CHECK": "1"}).check is True
    assert Settings.from_env({"PYDDL_ALLREDUCE": ""}).allreduce == "native"  # empty: unset


@pytest.mark.parametrize("kw, text", [
    (dict(timeout_s=0), "timeout must be a positive, finite number of seconds, got 0"),
    (dict(timeout_s=-1.0), "got -1.0"),
    (dict(timeout_s=math.nan), "got nan"),
    (dict(timeout_s=math.inf), "got inf"),
    (dict(chunk_bytes=0), "chunk_bytes must be a positive whole number of bytes, got 0"),
    (dict(chunk_bytes=-5), "got -5"),
    (dict(chunk_bytes=1.5), "got 1.5"),
    (dict(allreduce="ring"), "unknown allreduce algorithm 'ring'; choose one of native, multiring, auto"),
    (dict(compression="int8"), "unknown compression 'int8'; choose one of none, fp16, bf16"),
    (dict(topology=""), "the topology is empty"),
    (dict(topology="2xa"), "is not of the form AxBxC"),
    (dict(stall_warn_s=0), "stall warning must be a positive"),
])
def test_bad_values_are_one_clear_error(kw, text):
    with pytest.raises(ValueError, match=None) as err:
        Settings(**kw)
    assert text in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("env, text", [
    ({"PYDDL_TIMEOUT": "soon"}, "PYDDL_TIMEOUT='soon' is not a valid float"),
    ({"PYDDL_CHUNK_BYTES": "2M"}, "PYDDL_CHUNK_BYTES='2M' is not a valid int"),
    ({"PYDDL_TIMEOUT": "nan"}, "timeout must be a positive, finite number"),
])
def test_bad_environment_names_the_variable(env, text):
    with pytest.raises(ValueError) as err:
        Settings.from_env(env)
    assert text in str(err.value)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.from_env({}, timeout=3)
