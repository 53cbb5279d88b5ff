"""A Horovod-shaped script runs under `pyddl run` with only its import changed, and learns."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cli, pytest.mark.timeout(150)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "horovod_mnist_style.py"


@pytest.mark.parametrize("extra", [[], ["--fp16-allreduce"]], ids=["none", "fp16"])
def test_horovod_mnist_style_script_learns(extra):
    proc = subprocess.run(
        [sys.executable, "-m", "pyddl.cli.main", "run", "-np", "2", str(EXAMPLE), "--epochs", "2", *extra],
        capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "[rank0] 2 workers x batch 32, lr 0.02" in out  # Horovod's lr scaling by size
    epochs = re.findall(r"\[rank0\] Epoch (\d): average train loss ([\d.]+), \d+ images/s on 2 workers", out)
    assert [e[0] for e in epochs] == ["1", "2"], out[-2000:]
    losses = [float(e[1]) for e in epochs]
    assert losses[1] < 0.5 * losses[0], losses
    accuracies = re.findall(r"\[rank0\] Test set: Average loss: [\d.]+, Accuracy: ([\d.]+)%", out)
    assert len(accuracies) == 2 and float(accuracies[-1]) > 50.0  # ten classes: chance is 10%
    assert "[rank1]" not in out  # rank 0 alone reports, as in Horovod's examples


def test_sparse_embedding_example_allgathers_rows_and_ends_as_the_densified_run():
    example = EXAMPLE.parent / "sparse_embedding.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pyddl.cli.main", "run", "-np", "2", str(example), "--table-rows", "20000",
         "--steps", "4"],
        capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[rank0] 2 workers, a 5 MB table, 256 rows per rank per step" in proc.stdout
    assert re.search(r"\[rank0\] rows allgathered \(sparse_as_dense=False\): +[\d.]+ ms per step", proc.stdout)
    assert re.search(r"\[rank0\] table densified  \(sparse_as_dense=True\): +[\d.]+ ms per step", proc.stdout)
    assert "[rank0] same table after 4 steps: True" in proc.stdout
