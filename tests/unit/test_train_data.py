"""Data sets, the shard sampler over simulated ranks, and each data error message."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyddl.train.data import (
    ShardSampler, SyntheticImages, class_fingerprint, digits_split, fingerprint_int64,
    image_folder_split, load_data, shard_batches,
)
from pyddl.train.recipe import steps_per_epoch


def epoch_of(n, world, batch, epoch=0, seed=0, partial="drop"):
    return [shard_batches(n, r, world, batch, epoch, seed, partial=partial) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [96, 100, 101])
def test_even_mode_sees_every_sample_exactly_once(world, n):
    batch = 8 * world
    ranks = epoch_of(n, world, batch, partial="even")
    assert len({len(b) for b in ranks}) == 1                      # same batch count per rank
    assert len(ranks[0]) == -(-n // batch)
    seen = sorted(i for b in ranks for step in b for i in step)
    assert seen == list(range(n))
    last = [len(b[-1]) for b in ranks]
    assert max(last) - min(last) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_drop_mode_full_equal_batches_each_kept_sample_once(world):
    n, batch = 101, 6 * world
    ranks = epoch_of(n, world, batch)
    assert {len(b) for b in ranks} == {n // batch}
    assert {len(step) for b in ranks for step in b} == {batch // world}
    seen = [i for b in ranks for step in b for i in step]
    assert len(seen) == len(set(seen)) == (n // batch) * batch
    assert len(ranks[0]) == steps_per_epoch(n, batch, drop_last=True)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pad_mode_full_batches_every_sample_at_least_once(world):
    n, batch = 101, 6 * world
    ranks = epoch_of(n, world, batch, partial="pad")
    assert {len(b) for b in ranks} == {-(-n // batch)}
    assert {len(step) for b in ranks for step in b} == {batch // world}
    counts = collections.Counter(i for b in ranks for step in b for i in step)
    assert set(counts) == set(range(n))
    assert sum(counts.values()) - n == batch - n % batch        # only the padding repeats


@pytest.mark.parametrize("world", [2, 3, 4])
def test_n_ranks_see_the_batches_of_one_rank_at_n_times_the_batch(world):
    one = shard_batches(100, 0, 1, 4 * world, epoch=3, seed=7)
    ranks = epoch_of(100, world, 4 * world, epoch=3, seed=7)
    for j, step in enumerate(one):
        assert [i for r in ranks for i in r[j]] == step


def test_reshuffled_every_epoch_and_reproducible():
    e0, e1 = shard_batches(100, 0, 1, 10, 0, seed=1), shard_batches(100, 0, 1, 10, 1, seed=1)
    assert e0 != e1
    assert e0 == shard_batches(100, 0, 1, 10, 0, seed=1)
    assert e0 != shard_batches(100, 0, 1, 10, 0, seed=2)
    assert shard_batches(10, 0, 1, 5, 0, shuffle=False) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_sampler_resumes_mid_epoch():
    s = ShardSampler(100, 1, 2, 10, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert len(s) == s.num_batches == 10
    s.set_epoch(2, start_batch=4)
    assert list(s) == full[4:] and len(s) == 6
    state = s.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    fresh = ShardSampler(100, 1, 2, 10, seed=3)
    fresh.load_state_dict(state)
    assert list(fresh) == full[4:]
    s.set_epoch(3)
    assert list(s) != full


def test_sampler_state_from_another_run_is_refused():
    state = ShardSampler(100, 0, 2, 10, seed=3).state_dict()
    with pytest.raises(ValueError, match="dataset_size=100, this run has 90"):
        ShardSampler(90, 0, 2, 10, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="resume with the same --data and --seed"):
        ShardSampler(100, 0, 2, 10, seed=4).load_state_dict(state)


def test_sampler_follows_a_batch_ramp():
    s = ShardSampler(1000, 0, 4, 64)
    s.set_global_batch(256)
    assert s.num_batches == 3 and {len(b) for b in s} == {64}


def test_sampler_drives_a_dataloader():
    ds = TensorDataset(torch.arange(20.0), torch.arange(20))
    s = ShardSampler(20, 1, 2, 4, seed=0)
    got = [y.tolist() for _, y in DataLoader(ds, batch_sampler=s)]
    assert got == shard_batches(20, 1, 2, 4, 0, seed=0)


@pytest.mark.parametrize("args, message", [
    ((100, 0, 2, 256), r"global batch 256 \(2 workers x 128\) is larger than the 100 training "
                       r"samples.*lower --batch-size to at most 50 per worker"),
    ((100, 0, 4, 10), "global batch 10 is not divisible by 4 workers"),
    ((100, 2, 2, 10), r"rank 2 is outside 0..1"),
    ((0, 0, 1, 1), "the data set is empty"),
])
def test_sampler_errors(args, message):
    with pytest.raises(ValueError, match=message):
        ShardSampler(*args)


def test_unknown_partial_mode():
    with pytest.raises(ValueError, match="partial must be one of drop, pad, even"):
        ShardSampler(10, 0, 1, 2, partial="wrap")


def test_even_mode_accepts_a_batch_larger_than_the_data():
    ranks = epoch_of(5, 4, 8, partial="even")
    assert sorted(i for b in ranks for s in b for i in s) == list(range(5))
    assert [len(b[0]) for b in ranks] == [1, 1, 1, 2]


def test_digits_split_is_fixed_and_stratified():
    a, b = digits_split(), digits_split()
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    x = a.train.tensors[0]
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert not torch.equal(a.train.tensors[1], digits_split(split_seed=1).train.tensors[1])


def test_digits_split_is_scikit_learns_without_importing_it():
    # Read from scikit-learn's file and split as its train_test_split(stratify=y) splits: the
    # same test images as before, without 1.5 s of imports in every worker.
    code = ("import sys; from pyddl.train.data import digits_split; s = digits_split(0.2, 3); "
            "print(len(s.train), 'sklearn' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["1437", "False"], proc.stderr
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    for seed, fraction in ((0, 0.2), (3, 0.2), (1, 0.37)):
        ours = digits_split(fraction, seed)
        theirs = train_test_split(x, bunch.target, test_size=fraction, random_state=seed, stratify=bunch.target)
        got = [ours.train.tensors[0], ours.test.tensors[0], ours.train.tensors[1], ours.test.tensors[1]]
        assert all(np.array_equal(a.numpy(), b) for a, b in zip(got, theirs)), (seed, fraction)


def test_digits_from_a_scikit_learn_that_keeps_them_elsewhere(monkeypatch):
    import pyddl.train.data as data

    ours = digits_split()
    monkeypatch.setattr(data, "_digits_file", lambda: None)  # load_digits reads them instead
    theirs = digits_split()
    assert all(torch.equal(a, b) for a, b in zip(ours.train.tensors + ours.test.tensors,
                                                 theirs.train.tensors + theirs.test.tensors))


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits_split()


def test_synthetic_images_are_deterministic_per_index():
    a, b = SyntheticImages(50, (3, 16, 16), 10, seed=5), SyntheticImages(50, (3, 16, 16), 10, seed=5)
    x0, y0 = a[7]
    assert x0.shape == (3, 16, 16) and 0 <= int(y0) < 10
    assert torch.equal(x0, b[7][0]) and int(y0) == int(b[7][1])
    assert len({a[i][0].sum().item() for i in range(50)}) > 10          # drawn from a pool of 32
    assert len({int(a[i][1]) for i in range(50)}) == 10
    assert not torch.equal(x0, SyntheticImages(50, (3, 16, 16), 10, seed=6)[7][0])
    x0.zero_()
    assert not torch.equal(x0, a[7][0])                                 # callers get a copy
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError, match="synthetic data needs"):
        SyntheticImages(0)


def test_load_data_dispatch():
    syn = load_data("synthetic", synthetic_size=40, image_size=32, num_classes=7)
    assert (len(syn.train), len(syn.test), syn.num_classes) == (40, 4, 7)
    assert syn.input_shape == (3, 32, 32)
    assert load_data("digits").num_classes == 10
    with pytest.raises(ValueError, match="--data is empty"):
        load_data("")


def _tree(root, layout):
    from PIL import Image

    for split, classes in layout.items():
        for name, count in classes.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(os.path.join(folder, f"{i}.png"))


def test_image_folder_loads(tmp_path):
    _tree(tmp_path, {"train": {"cat": 2, "dog": 3}, "val": {"cat": 1, "dog": 1}})
    split = image_folder_split(str(tmp_path), image_size=24)
    assert split.classes == ("cat", "dog") and (len(split.train), len(split.test)) == (5, 2)
    x, y = split.train[4]
    assert x.shape == (3, 24, 24) and y == 1
    assert split.test[0][0].shape == (3, 24, 24)


@pytest.mark.parametrize("layout, sub, message", [
    (None, "nowhere", r"data folder .*nowhere' does not exist.*--data digits"),
    ({"train": {"a": 1}}, "", r"val/ folder .* does not exist.*needs .*/train and .*/val"),
    ({"train": {"a": 1}, "val": {}}, "", r"no class folders in .*val'.*one sub-folder per class"),
    ({"train": {"a": 1, "b": 0}, "val": {"a": 1, "b": 1}}, "",
     r"train'.*put at least one image in every class folder"),
    ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, "",
     r"different classes \(only in train: \['b'\], only in val: \['c'\]\)"),
])
def test_image_folder_errors(tmp_path, layout, sub, message):
    if layout:
        _tree(tmp_path, layout)
        for split in layout:
            os.makedirs(tmp_path / split, exist_ok=True)
    with pytest.raises(ValueError, match=message):
        load_data(str(tmp_path / sub) if sub else str(tmp_path))


def test_class_fingerprint():
    fp = class_fingerprint(["dog", "cat"])
    assert fp == class_fingerprint(("cat", "dog")) and len(fp) == 64
    assert fp != class_fingerprint(["cat", "dogs"])
    assert fp != class_fingerprint(["cat", "dog", "eel"])
    value = fingerprint_int64(fp)
    assert 0 <= value < 2**63 and value == fingerprint_int64(class_fingerprint(["cat", "dog"]))
    assert np.int64(value) == value
