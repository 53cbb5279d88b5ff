"""Issue 23 as a new user meets it: bad values are one line and exit 2 before any worker starts,
flags are never abbreviated, and no worker outlives, or outwaits, its launcher."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cli, pytest.mark.timeout(120)]

PYDDL = [sys.executable, "-m", "pyddl.cli.main"]


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def _run(args, cwd, timeout=100):
    return subprocess.run(PYDDL + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())


def test_version_and_no_abbreviations(tmp_path):
    proc = _run(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("pyddl ") and proc.stdout.split()[1][0].isdigit()
    for typed, meant in (["--epohcs", "--epochs"], ["--epoch", "--epochs"], ["--batch", "--batch-size"]):
        proc = _run(["train", typed, "1"], tmp_path)
        # The subcommand's own usage, not the top level's, and the flag that was meant.
        assert proc.returncode == 2 and proc.stderr.startswith("usage: pyddl train "), proc.stderr
        assert proc.stderr.splitlines()[-1] == (
            f"pyddl train: error: unrecognized arguments: {typed} 1; did you mean {meant}?")
    assert not (tmp_path / "runs").exists()  # nothing trained on an abbreviation
    proc = _run(["bench", "allreduce", "--size", "1M"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith("did you mean --sizes?")
