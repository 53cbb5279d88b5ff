"""Checkpoints: atomic writes, safe loading, corruption fallback, exact resume, no poisoned saves."""

import os
import random
import warnings

import numpy as np
import pytest
import torch

from pyddl.train import checkpoint as ckpt
from pyddl.train.checkpoint import (
    CheckpointManager, NonFiniteError, apply_state, atomic_save, capture_rng_state,
    ensure_finite, make_state, nonfinite_entries, restore_rng_state,
)
from pyddl.train.data import ShardSampler
from pyddl.train.models import SmallCNN
from pyddl.train.optim import build_optimizer

MARKER = "pyddl-checkpoint-code-ran"


class _Evil:
    """Unpickling this would run os.system; weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN()
    return model, build_optimizer("lars", model, 0.05), ShardSampler(64, 0, 1, 8, seed=seed)


def _train(model, opt, sampler, epoch, start, steps):
    sampler.set_epoch(epoch, start)
    for step, idx in zip(range(steps), sampler):
        # The noise draws from torch's global RNG, so a resume must restore it exactly.
        x = torch.randn(len(idx), 1, 8, 8) + torch.tensor(idx, dtype=torch.float32)[:, None, None, None] / 64
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_interrupted_and_resumed_training_is_bit_identical(tmp_path):
    model, opt, sampler = _setup()
    _train(model, opt, sampler, epoch=0, start=0, steps=3)
    mgr = CheckpointManager(tmp_path)
    mgr.save(make_state(model, opt, epoch=0, step=3, global_step=3, sampler=sampler), index=3)
    _train(model, opt, sampler, epoch=0, start=3, steps=5)
    _train(model, opt, sampler, epoch=1, start=0, steps=8)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    random.random(), np.random.rand(), torch.rand(3)          # disturb every RNG
    fresh, fresh_opt, fresh_sampler = _setup(seed=0)
    index, state = mgr.load_latest()
    pos = apply_state(state, fresh, fresh_opt, sampler=fresh_sampler)
    assert index == 3 and pos == {"epoch": 0, "step": 3, "global_step": 3}
    _train(fresh, fresh_opt, fresh_sampler, epoch=pos["epoch"], start=pos["step"], steps=5)
    _train(fresh, fresh_opt, fresh_sampler, epoch=1, start=0, steps=8)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_weights_only_load_and_contents(tmp_path):
    model, opt, sampler = _setup()
    _train(model, opt, sampler, 0, 0, 1)
    path = CheckpointManager(tmp_path).save(
        make_state(model, opt, epoch=0, step=1, global_step=1, sampler=sampler,
                   extra={"config": {"epochs": 5, "milestones": [1, 2]}}), index=0)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"format", "model", "optimizer", "position", "rng", "sampler", "extra"}
    assert state["sampler"]["start_batch"] == 0 and state["extra"]["config"]["epochs"] == 5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state["model"].items())
    assert state["optimizer"]["state"]


def test_rng_round_trip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_apply_state_requires_what_it_is_given():
    model, opt, sampler = _setup()
    state = make_state(model, opt, epoch=0, step=0, global_step=0)
    with pytest.raises(ValueError, match="checkpoint has no sampler state"):
        apply_state(state, model, opt, sampler=sampler)


def test_atomic_save_leaves_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-000001.pt"
    digest = atomic_save({"w": torch.ones(3)}, path)
    assert (tmp_path / "ckpt-000001.pt.sha256").read_text().split()[0] == digest

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000001.pt", "ckpt-000001.pt.sha256"]
    assert torch.equal(CheckpointManager(tmp_path).load(1)["w"], torch.ones(3))


@pytest.mark.timeout(30)
def test_a_ctrl_c_during_the_write_arrives_after_both_files_are_in_place(tmp_path, monkeypatch):
    # The trainer's Ctrl-C handler raises SystemExit; raised inside torch.save's zip writer it
    # made the writer's cleanup raise a second exception with a traceback.
    import signal

    path = tmp_path / "ckpt-000001.pt"
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next bytecode, were it not held
        real_save(obj, f)

    def exit_quietly(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGINT, exit_quietly)
    try:
        monkeypatch.setattr(ckpt.torch, "save", interrupted_save)
        with pytest.raises(SystemExit) as exc:
            atomic_save({"w": torch.full((3,), 2.0)}, path)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert exc.value.code == 130
    assert signal.getsignal(signal.SIGINT) is previous
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000001.pt", "ckpt-000001.pt.sha256"]
    assert torch.equal(CheckpointManager(tmp_path).load(1)["w"], torch.full((3,), 2.0))


def _save_and_die(directory):
    # A writer killed in the middle of torch.save, as a worker killed while saving is.
    import signal

    def die(obj, f):
        f.write(b"x" * 4096)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    ckpt.torch.save = die
    CheckpointManager(directory).save({"w": torch.ones(3)}, index=2)


def test_a_save_killed_midway_leaves_a_temporary_the_next_save_removes(tmp_path):
    import multiprocessing

    mgr = CheckpointManager(tmp_path)
    mgr.save({"w": torch.ones(3)}, index=1)
    # forkserver, not fork: this pytest process may have started JAX's threads (tests/unit/test_jax_pure.py).
    proc = multiprocessing.get_context("forkserver").Process(target=_save_and_die, args=(tmp_path,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -9
    stale = sorted(p.name for p in tmp_path.glob(".ckpt-*.tmp"))
    assert len(stale) == 1 and stale[0].startswith(".ckpt-000002.pt.")
    mgr.save({"w": torch.zeros(3)}, index=2)
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-000001.pt", "ckpt-000001.pt.sha256", "ckpt-000002.pt", "ckpt-000002.pt.sha256"]
    # At start (pyddl train's rank 0) the same cleaning, with the names returned.
    (tmp_path / ".ckpt-000003.pt.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in mgr.remove_stale_temps()] == [".ckpt-000003.pt.abc.tmp"]
    assert mgr.indices() == [1, 2] and not list(tmp_path.glob("*.tmp"))


def test_keeps_the_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for i in range(1, 6):
        mgr.save({"i": i}, index=i)
    assert mgr.indices() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-000004.pt", "ckpt-000004.pt.sha256", "ckpt-000005.pt", "ckpt-000005.pt.sha256"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointManager(tmp_path, keep=0)


def _damage_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_sidecar(path):
    os.unlink(f"{path}.sha256")


@pytest.mark.parametrize("damage, reason", [
    (_damage_truncate, "truncated"), (_damage_flip, "corrupted"), (_damage_sidecar, "did not finish"),
])
def test_bad_latest_falls_back_with_a_warning(tmp_path, damage, reason):
    mgr = CheckpointManager(tmp_path, keep=3)
    for i in (1, 2):
        mgr.save({"w": torch.full((1000,), float(i))}, index=i)
    damage(mgr.path(2))
    with pytest.warns(RuntimeWarning, match=rf"ckpt-000002\.pt.*{reason}"):
        index, state = mgr.load_latest()
    assert index == 1 and torch.equal(state["w"], torch.full((1000,), 1.0))


def test_no_good_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path / "absent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.load_latest() == (None, None)
    mgr = CheckpointManager(tmp_path)
    mgr.save({"w": torch.ones(1)}, index=0)
    _damage_flip(mgr.path(0))
    with pytest.warns(RuntimeWarning, match="ckpt-000000"):
        assert mgr.load_latest() == (None, None)


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / MARKER
    mgr = CheckpointManager(tmp_path)
    mgr.save({"w": torch.ones(1)}, index=1)
    atomic_save({"w": torch.ones(1), "x": _Evil(marker)}, mgr.path(2))   # valid sidecar
    with pytest.warns(RuntimeWarning, match=r"ckpt-000002\.pt.*weights_only"):
        index, _ = mgr.load_latest()
    assert index == 1 and not marker.exists()


def test_refuses_to_save_non_finite_values(tmp_path):
    model, opt, _ = _setup()
    mgr = CheckpointManager(tmp_path)
    good = mgr.save(make_state(model, opt, epoch=0, step=0, global_step=0), index=1)
    before = good.read_bytes()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.head\.bias.*previous checkpoints are kept"):
        mgr.save(make_state(model, opt, epoch=0, step=1, global_step=1), index=2)
    assert mgr.indices() == [1] and good.read_bytes() == before


def test_nonfinite_entries_walks_nested_state():
    state = {"a": torch.ones(2), "b": {"c": [torch.tensor([1.0, float("inf")]), 3]},
             "n": torch.tensor([1, 2]), "f": float("nan"), "ok": 0.5}
    assert nonfinite_entries(state) == ["b.c.0", "f"]
    ensure_finite({"a": torch.zeros(3), "k": "text", "none": None})
