"""`pyddl train`'s loop on Gloo ranks: n workers x b equal one worker x n b, an interrupted and
resumed run is bit-identical to an uninterrupted one (also after falling back from a corrupt
checkpoint), and the in-job CLI path trains on the job's ranks."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

# Float32 sums in a different order (one batch of 32 vs two of 16 averaged) drift by rounding
# only: over these 20 SGD-momentum steps the largest difference measured was 1.5e-8, against
# parameters that moved by 2.7e-2.
EQUIVALENCE_ATOL = 1e-6


def _mlp():
    # No BatchNorm: its statistics are per worker, so a BN model is not equivalent by design.
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _train_mlp(rank, world, out, batch_size):
    from pyddl.train.config import TrainConfig
    from pyddl.train.trainer import train

    cfg = TrainConfig(epochs=2, batch_size=batch_size, max_steps_per_epoch=10, out=out,
                      warmup_epochs=0.5, log_every_s=1e9)
    result = train(cfg, model=_mlp())
    return [p.detach().clone() for p in result.model.parameters()], result.summary


def _two_ranks(rank, world, root):
    """The 2-worker MLP run, then `pyddl train` inside this job: a good run and a diverging one."""
    import contextlib
    import io

    import pyddl
    from pyddl.cli.main import main

    # One session for all three runs: pyddl.init() after pyddl.shutdown() in the same
    # processes can fail to connect (a rank reads the previous session's addresses).
    pyddl.init()
    mlp = _train_mlp(rank, world, f"{root}/two", 16)
    flags = ["--epochs", "1", "--max-steps-per-epoch", "3", "--log-every", "1000"]
    good = main(["train", *flags, "--out", f"{root}/job"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bad = main(["train", *flags, "--out", f"{root}/nan", "--base-lr", "1e30"])
    pyddl.shutdown()
    return mlp, good, bad, err.getvalue()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    return root, run_ranks(_two_ranks, 2, str(root))


def test_two_workers_equal_one_worker_at_the_doubled_batch(two_ranks, tmp_path):
    two = [mlp for mlp, *_ in two_ranks[1]]
    one, = run_ranks(_train_mlp, 1, str(tmp_path / "one"), 32)
    for a, b in zip(two[0][0], two[1][0]):
        assert torch.equal(a, b)  # ranks hold identical parameters
    moved = max((p - q).abs().max().item() for p, q in zip(one[0], _mlp().parameters()))
    assert moved > 1e-2  # training really changed them
    for p2, p1 in zip(two[0][0], one[0]):
        torch.testing.assert_close(p2, p1, rtol=0, atol=EQUIVALENCE_ATOL)
    s2, s1 = two[0][1], one[1]
    assert (s2["workers"], s2["global_batch"], s1["workers"], s1["global_batch"]) == (2, 32, 1, 32)
    assert s2["model"] == s1["model"] == "Sequential"
    assert s2["steps"] == s1["steps"] == 20
    assert s2["test_top1"] == pytest.approx(s1["test_top1"], abs=1 / 360)


def test_pyddl_train_inside_a_job_trains_on_its_ranks(two_ranks):
    root, results = two_ranks
    assert [good for _, good, _, _ in results] == [0, 0]
    summary = json.loads((root / "job" / "summary.json").read_text())
    assert (summary["workers"], summary["global_batch"], summary["steps"]) == (2, 64, 3)
    # A run that fails exits 1 on every rank with its one-line reason, no traceback.
    for _, _, bad, err in results:
        assert bad == 1
        assert err.startswith("pyddl train: the loss became nan at optimizer step ")
        assert "Traceback" not in err


def _params(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def _resume_scenarios(rank, world, root):
    import pyddl
    from pyddl.train.config import TrainConfig
    from pyddl.train.trainer import train

    pyddl.init()  # stays up across the runs below (train() then leaves it alone)
    base = dict(epochs=3, max_steps_per_epoch=4, log_every_s=1e9)
    whole = _params(train(TrainConfig(out=f"{root}/whole", **base)))

    stopped = train(TrainConfig(out=f"{root}/split", stop_after_epoch=1, **base))
    resumed = _params(train(TrainConfig(out=f"{root}/split", resume=True, **base)))

    train(TrainConfig(out=f"{root}/corrupt", stop_after_epoch=2, **base))
    if rank == 0:
        path = Path(f"{root}/corrupt/checkpoints/ckpt-000002.pt")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    pyddl.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _params(train(TrainConfig(out=f"{root}/corrupt", resume=True, **base)))
    pyddl.shutdown()
    return (whole, stopped.summary["stopped_after_epoch"], resumed, fallback,
            [str(w.message) for w in caught])


def test_interrupted_and_resumed_runs_are_bit_identical_even_after_a_corrupt_checkpoint(tmp_path):
    results = run_ranks(_resume_scenarios, 2, str(tmp_path))
    for whole, stopped_after, resumed, fallback, caught in results:
        assert stopped_after == 1
        assert any("num_batches_tracked" in k for k in whole)  # the default model, BN included
        for name, value in whole.items():
            assert torch.equal(resumed[name], value), name
            assert torch.equal(fallback[name], value), name
        assert any("skipping bad checkpoint" in m and "ckpt-000002.pt" in m and "SHA-256" in m
                   for m in caught), caught
    assert all(torch.equal(results[0][0][k], results[1][0][k]) for k in results[0][0])
    for run in ("whole", "split", "corrupt"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2], run
    corrupt = json.loads((tmp_path / "corrupt" / "summary.json").read_text())
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert corrupt["test_top1"] == whole["test_top1"] and corrupt["steps"] == whole["steps"] == 12
