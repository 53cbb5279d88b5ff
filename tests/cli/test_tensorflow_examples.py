"""Horovod's TF2 GradientTape and Keras model.fit examples, with only the import changed, run
under `pyddl run -np 2` on the digits and learn."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.cli,
    pytest.mark.timeout(250),
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs the tensorflow extra"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
           TF_ENABLE_ONEDNN_OPTS="0")


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pyddl.cli.main", "run", "-np", "2", str(EXAMPLES / script), *args],
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    source = (EXAMPLES / script).read_text()
    assert len(re.findall(r"^import pyddl\.(tensorflow|keras) as hvd  # was: import horovod\.", source, re.M)) == 1
    return proc.stdout


def test_tensorflow2_gradient_tape_example_learns():
    out = _run("tensorflow2_mnist_style.py", "--steps", "160")
    losses = [float(v) for v in re.findall(r"\[rank0\] Step #\d+\tLoss: ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], out[-2000:]
    accuracy = float(re.search(r"\[rank0\] Final loss: [\d.]+  test accuracy: ([\d.]+)", out).group(1))
    assert accuracy > 0.6, out[-2000:]  # ten classes: chance is 0.1


def test_keras_fit_example_with_the_callbacks_learns():
    out = _run("keras_mnist_style.py", "--epochs", "4")
    assert "[rank0] Epoch 2: finished gradual learning rate warmup to 0.004." in out
    epochs = re.findall(r"\[rank0\] 32/32 - .* - accuracy: ([\d.]+) - loss: ([\d.]+) - lr: ([\d.]+)", out)
    assert len(epochs) == 4, out[-2000:]
    assert float(epochs[-1][1]) < 0.7 * float(epochs[0][1])
    assert float(epochs[0][2]) < 0.004 and float(epochs[-1][2]) == 0.004  # warmup to lr x size
    accuracy = float(re.search(r"\[rank0\] test accuracy: ([\d.]+)", out).group(1))
    assert accuracy > 0.6, out[-2000:]
