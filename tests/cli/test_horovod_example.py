"""A Horovod-shaped script runs under `pyddl run` with only its import changed, and learns."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cli, pytest.mark.timeout(150)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "horovod_style.py"


@pytest.mark.parametrize("extra", [[], ["--fp16-allreduce"]])
def test_horovod_style_script_learns(extra):
    proc = subprocess.run(
        [sys.executable, "-m", "pyddl.cli.main", "run", "-np", "2", str(EXAMPLE), "--epochs", "3", *extra],
        capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = re.findall(r"\[rank0\] epoch (\d) train loss ([\d.]+) test accuracy ([\d.]+)", proc.stdout)
    assert [e[0] for e in epochs] == ["1", "2", "3"]
    losses = [float(e[1]) for e in epochs]
    assert losses[-1] < losses[0] * 0.8
    assert float(epochs[-1][2]) > 0.5  # ten classes: chance is 0.1
