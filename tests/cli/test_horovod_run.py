"""Horovod's self-launching scripts: `import pyddl as horovod; horovod.run(fn, args, np=N)`
starts N workers through pyddl's launcher and returns each rank's result in rank order, as
`horovod.run` does. The function travels by reference: defined in the script, imported there
by each worker (the script's `if __name__ == "__main__":` block does not run again)."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.cli, pytest.mark.timeout(120)]

SCRIPT = textwrap.dedent('''
    import os

    import torch

    import pyddl as horovod
    import pyddl.torch as hvd


    def train(base, scale=1):
        before = [os.environ.get(f"HOROVOD_{k}") for k in ("RANK", "SIZE")]
        hvd.init()
        total = hvd.allreduce(torch.tensor([float(hvd.rank() + base)]), op=hvd.Sum).item()
        after = [os.environ[f"HOROVOD_{k}"] for k in ("LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")]
        return {"rank": hvd.rank(), "size": hvd.size(), "total": total * scale, "env": before + after}


    if __name__ == "__main__":
        print("RESULTS", horovod.run(train, args=(10,), kwargs={"scale": 2}, np=2, hosts="localhost:2"))
''')


def test_run_returns_each_ranks_result(tmp_path):
    script = tmp_path / "self_launching.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Rank r contributes 10 + r: the sum is 21 on both ranks, times scale=2. The launcher's
    # workers see HOROVOD_RANK and _SIZE before hvd.init(), the local and cross ones after it.
    want = [{"rank": r, "size": 2, "total": 42.0, "env": [str(r), "2", str(r), "2", "0", "1"]} for r in (0, 1)]
    assert f"RESULTS {want}" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.count("RESULTS") == 1  # the workers did not run the script's main block


def test_run_refuses_what_cannot_travel_by_reference():
    import pyddl

    with pytest.raises(ValueError, match="must be defined at the top level"):
        pyddl.run(lambda: 1, np=2)
    with pytest.raises(NotImplementedError, match="pyddl run -H"):
        pyddl.run(pyddl.rank, np=2, hosts="other-server:2")
