"""Bad input on some or all ranks ends `pyddl train`'s loop on every rank with a message, and
nothing is lost: differing class folders, a rank whose data folder is missing, a non-finite
loss (stopped at its step, debug dump written, the good checkpoint left as it was). A restart
that finds no good checkpoint starts over; an explicit --resume stops."""

import dataclasses
import hashlib
from pathlib import Path

import pytest

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def _image_folder(root: Path, classes) -> str:
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(root / split / c / f"{i}.png")
    return str(root)


def _outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:  # the test compares each rank's error type and text
        return f"{type(exc).__name__}: {exc}"


def _bad_input(rank, root):
    from pyddl.train.config import TrainConfig
    from pyddl.train.trainer import train

    small = dict(model="small_cnn", image_size=8, batch_size=1, epochs=1, log_every_s=1e9)
    mine = f"{root}/rank{rank}"
    layout = _outcome(lambda: train(TrainConfig(data=mine, out=f"{root}/layout", **small)))
    missing = f"{root}/rank0" if rank == 0 else f"{root}/nowhere"
    one_missing = _outcome(lambda: train(TrainConfig(data=missing, out=f"{root}/missing", **small)))
    return layout, one_missing


def _nonfinite(rank, out):
    import pyddl
    from pyddl.train.config import TrainConfig
    from pyddl.train.trainer import train

    base = dict(epochs=2, max_steps_per_epoch=4, out=out, log_every_s=1e9)
    train(TrainConfig(stop_after_epoch=1, **base))
    good = Path(out, "checkpoints", "ckpt-000001.pt").read_bytes()
    pyddl.barrier()
    # A resume with another --base-lr is refused on every rank unless allowed...
    refused = _outcome(lambda: train(TrainConfig(resume=True, base_lr=1e30, **base)))
    # ... and allowed, a learning rate that blows up: weights overflow within a few steps.
    outcome = _outcome(lambda: train(TrainConfig(resume=True, allow_changes=True, base_lr=1e30, **base)))
    return outcome, hashlib.sha256(good).hexdigest(), refused


def _restart_over_bad_checkpoints(rank, out):
    import os

    import pyddl
    from pyddl.train.config import TrainConfig
    from pyddl.train.trainer import train

    folder = Path(out, "checkpoints")
    if rank == 0:  # a crash during the first write: a checkpoint without its sidecar
        folder.mkdir(parents=True)
        (folder / "ckpt-000000.pt").write_bytes(b"half a checkpoint")
    pyddl.barrier()
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=2, out=out, log_every_s=1e9)
    explicit = _outcome(lambda: train(dataclasses.replace(cfg, resume=True)))
    os.environ["PYDDL_RESTART_COUNT"] = "1"  # what the launcher sets for a restarted attempt
    try:
        restarted = _outcome(lambda: train(cfg))
    finally:
        del os.environ["PYDDL_RESTART_COUNT"]
    return explicit, restarted, (folder / "ckpt-000001.pt").exists()


def _scenarios(rank, world, root):
    import pyddl

    pyddl.init()  # one session for every run (train() leaves it up)
    results = (_bad_input(rank, root), _nonfinite(rank, f"{root}/run"),
               _restart_over_bad_checkpoints(rank, f"{root}/restart"))
    pyddl.shutdown()
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    _image_folder(root / "rank0", ["cat", "dog"])
    _image_folder(root / "rank1", ["cat", "emu"])
    return root, run_ranks(_scenarios, 2, str(root))


def test_differing_class_folders_and_one_rank_without_data_stop_every_rank(outcomes):
    tmp_path, results = outcomes
    (r0_layout, r0_missing), (r1_layout, r1_missing) = [r[0] for r in results]
    for text in (r0_layout, r1_layout):
        assert text.startswith("ValueError: the class folders differ across ranks (rank 0: 2 "
                               "classes (fingerprint "), text
        assert "; rank 1: 2 classes (fingerprint " in text
        assert "copy the same data set to every server" in text
    assert r1_missing.startswith("ValueError: data folder ") and "does not exist" in r1_missing
    assert r0_missing == ("PyddlError: start-up failed on rank(s) 1 (their error is printed "
                          "there); this rank stops too")
    assert not (tmp_path / "layout").exists() and not (tmp_path / "missing").exists()


def test_non_finite_loss_stops_every_rank_at_its_step_and_keeps_the_good_checkpoint(outcomes):
    import re

    import torch

    out = outcomes[0] / "run"
    results = [r[1] for r in outcomes[1]]
    for _, _, refused in results:
        assert refused == (f"ValueError: --resume: {out}/checkpoints/ckpt-000001.pt was written by a run with "
                           f"other values (--base-lr 0.1 -> 1e+30); resume with the values of that run, or add "
                           f"--allow-changes to continue from epoch 1 with the new ones"), refused
    texts = [t for t, _, _ in results]
    assert texts[0] == texts[1], texts  # the same verdict, at the same step, on both ranks
    match = re.match(r"NonFiniteLossError: the loss became (nan|inf) at optimizer step (\d+) "
                     r"\(epoch 1, batch (\d) of 4, lr [0-9.e+]+\); training stopped before "
                     r"applying that step", texts[0])
    assert match, texts[0]
    step = int(match.group(2))
    assert step == 4 + int(match.group(3))
    assert f"the last good checkpoint is {out}/checkpoints/ckpt-000001.pt" in texts[0]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts == ["ckpt-000001.pt"]
    assert hashlib.sha256((out / "checkpoints" / "ckpt-000001.pt").read_bytes()).hexdigest() \
        == results[0][1]
    for rank in (0, 1):
        dump = torch.load(out / "nonfinite" / f"step-{step}-rank-{rank}.pt", weights_only=True)
        assert dump["global_step"] == step and dump["inputs"].shape == (32, 1, 8, 8)
        assert dump["indices"].tolist() and ("model" in dump) == (rank == 0)


def test_a_restart_that_finds_no_good_checkpoint_starts_over_but_an_explicit_resume_stops(outcomes):
    _, results = outcomes
    for _, _, (explicit, restarted, saved) in results:
        assert explicit.startswith("ValueError: --resume: no checkpoint in") and "passed its check" in explicit
        assert restarted == "ok" and saved
