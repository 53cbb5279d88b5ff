"""Data sets for `pyddl train` and the sampler that gives each rank its own shard.

Three sources: scikit-learn's digits (no download), synthetic ImageNet-shaped tensors that are a
pure function of (seed, index), and a torchvision ImageFolder tree (DIR/train, DIR/val). The
sampler reshuffles from (seed, epoch) and hands every rank the same number of batches, so no
rank waits on a collective that another rank never joins (horovod #708, #1407).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "PARTIAL_MODES",
    "DataSplit",
    "ShardSampler",
    "SyntheticImages",
    "class_fingerprint",
    "digits_split",
    "fingerprint_int64",
    "image_folder_split",
    "load_data",
    "shard_batches",
]

PARTIAL_MODES = ("drop", "pad", "even")
# ImageNet channel statistics, the normalisation torchvision's classifiers were designed for.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataSplit:
    """A training set, a test set and what a model needs to know about them."""

    train: Dataset
    test: Dataset
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    resize: str = ""  # how the stored images become input_shape, for the start line

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> DataSplit:
    """Load scikit-learn's 8x8 digits (1797 images, 10 classes) with a fixed, stratified split.

    The split depends on `split_seed` only, never on the training seed, so runs with
    different seeds are scored on the same test images. It is the one scikit-learn's
    `train_test_split(..., stratify=y, random_state=split_seed)` makes. Pixels 0..16 are
    scaled to [0, 1].

    Args:
        test_fraction: share of the images held out for the test set.
        split_seed: seed of the split.

    Returns:
        A DataSplit of TensorDatasets with images of shape (1, 8, 8).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, target = _digits_arrays()
    x = (images.astype(np.float32) / 16.0)[:, None, :, :]
    y = target.astype(np.int64)
    train, test = _stratified_split(y, math.ceil(test_fraction * len(y)), split_seed)
    return DataSplit(
        train=TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
        test=TensorDataset(torch.from_numpy(x[test]), torch.from_numpy(y[test])),
        classes=tuple(str(c) for c in range(10)),
        input_shape=(1, 8, 8),
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' images (1797, 8, 8) and labels, read from the file scikit-learn ships them in.

    Importing scikit-learn costs every worker about 1.5 s of CPU (scipy and more), ten times
    the training of an epoch; the file is 60 KB. Where a scikit-learn keeps it elsewhere,
    its own `load_digits` reads it.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _digits_file() -> str | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("--data digits needs scikit-learn: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


def _stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, each class split in proportion: the draws of scikit-learn's
    StratifiedShuffleSplit (random_state=seed), so the digits' test set is the one it gave."""
    rng = np.random.RandomState(seed)
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])

    def approximate_mode(counts: np.ndarray, n_draws: int) -> np.ndarray:
        # Each class's share of n_draws, rounded down; the draws left go to the classes with
        # the largest remainders, ties broken at random.
        continuous = counts / counts.sum() * n_draws
        floored = np.floor(continuous)
        need = int(n_draws - floored.sum())
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            if need <= 0:
                break
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need -= add_now
        return floored.astype(int)

    n_train = approximate_mode(class_counts, len(y) - n_test)
    n_test_per_class = approximate_mode(class_counts - n_train, n_test)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: n_train[i]])
        test.extend(members[n_train[i]: n_train[i] + n_test_per_class[i]])
    return rng.permutation(train), rng.permutation(test)


class SyntheticImages(Dataset):
    """Random images and labels for throughput runs, identical on every rank and every call.

    Sample i is a pure function of (seed, i), so no rank needs to hold or communicate the data
    set. Its image is one of `pool_size` random images made up front: drawing 3x224x224 normals
    per sample costs about 2 ms, enough to starve a GPU and skew the images/s being measured.
    There is nothing to learn: accuracy stays at chance.
    """

    def __init__(self, size: int, shape: tuple[int, ...] = (3, 224, 224),
                 num_classes: int = 1000, seed: int = 0, pool_size: int = 32):
        if size < 1 or num_classes < 1 or pool_size < 1 or any(d < 1 for d in shape):
            raise ValueError(
                f"synthetic data needs size, num_classes, pool_size >= 1 and a positive shape, "
                f"got size={size}, num_classes={num_classes}, pool_size={pool_size}, shape={shape}"
            )
        self.size, self.shape, self.num_classes, self.seed = size, tuple(shape), num_classes, seed
        pool_rng = np.random.default_rng([seed, size, num_classes])
        self.pool = torch.from_numpy(pool_rng.standard_normal((pool_size, *self.shape),
                                                              dtype=np.float32))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic samples")
        rng = np.random.default_rng([self.seed, index])
        label, slot = rng.integers(self.num_classes), rng.integers(len(self.pool))
        return self.pool[slot].clone(), torch.tensor(int(label))


def _require_dir(path: str, what: str, fix: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} does not exist or is not a folder; {fix}")


def _class_folders(split_dir: str) -> list[str]:
    # The same rule as torchvision's find_classes, so class indices agree with ImageFolder's.
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not names:
        raise ValueError(
            f"no class folders in {split_dir!r}; ImageFolder layout needs one sub-folder per "
            f"class, e.g. {split_dir}/cat/001.jpg, {split_dir}/dog/002.jpg"
        )
    return names


def image_folder_split(root: str, image_size: int = 224) -> DataSplit:
    """Open a torchvision ImageFolder tree: root/train/<class>/*.jpg and root/val/<class>/*.jpg.

    Training images get RandomResizedCrop + flip, validation images Resize + CenterCrop, both
    normalised with the ImageNet statistics.

    Args:
        root: the folder holding train/ and val/.
        image_size: side of the square crops fed to the model.

    Returns:
        A DataSplit of two torchvision ImageFolder datasets.

    Raises:
        ValueError: root, train/ or val/ missing; no class folders; a class folder without
            images; train/ and val/ with different classes.
        ImportError: torchvision is not installed.
    """
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise ImportError(
            f"--data {root} (an ImageFolder tree) needs torchvision: pip install torchvision"
        ) from exc
    _require_dir(root, "data folder", "pass --data digits, --data synthetic or an ImageFolder "
                 "root holding train/ and val/")
    layouts = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        _require_dir(split_dir, f"{split}/ folder", f"an ImageFolder root needs {root}/train "
                     f"and {root}/val, each with one sub-folder per class")
        layouts[split] = _class_folders(split_dir)
    if layouts["train"] != layouts["val"]:
        only_train = sorted(set(layouts["train"]) - set(layouts["val"]))
        only_val = sorted(set(layouts["val"]) - set(layouts["train"]))
        raise ValueError(
            f"train/ and val/ of {root!r} have different classes (only in train: {only_train[:5]}, "
            f"only in val: {only_val[:5]}); give both the same class folders"
        )
    normalize = transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize,
    ])
    val_tf = transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
        transforms.ToTensor(), normalize,
    ])
    sets = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        try:
            sets[split] = datasets.ImageFolder(os.path.join(root, split), transform=tf)
        except FileNotFoundError as exc:
            # torchvision raises this for a class folder with no image files in it.
            raise ValueError(
                f"{os.path.join(root, split)!r}: {exc}; put at least one image in every class "
                f"folder or remove the empty ones"
            ) from None
    return DataSplit(sets["train"], sets["val"], tuple(sets["train"].classes),
                     (3, image_size, image_size), _resize_note(sets["train"], image_size))


def _resize_note(images, image_size: int) -> str:
    # The first training image stands for the set: a 32-px set trained at 224 px is upscaled
    # 7x, which the user should see before the run, not guess from its accuracy.
    try:
        from PIL import Image

        with Image.open(images.samples[0][0]) as img:
            width, height = img.size
    except (ImportError, OSError, IndexError):
        return f"cropped and resized to {image_size} px"
    return f"cropped and resized to {image_size} px from {width}x{height} (the first training image)"


def load_data(spec: str, *, synthetic_size: int = 2_000, image_size: int | None = None,
              num_classes: int = 10, seed: int = 0) -> DataSplit:
    """Open the data set named by `--data`: "digits", "synthetic" or an ImageFolder root.

    Synthetic data gets `synthetic_size` training and synthetic_size // 10 (at least 1) test
    samples of shape (3, image_size, image_size), 32 px unless given; its test set uses a
    different seed. ImageFolder images are cropped and resized to image_size, 224 px unless given.

    Raises:
        ValueError: as `image_folder_split`, or an empty spec.
    """
    if spec == "digits":
        return digits_split()
    if spec == "synthetic":
        shape = (3, image_size or 32, image_size or 32)
        return DataSplit(
            SyntheticImages(synthetic_size, shape, num_classes, seed),
            SyntheticImages(max(1, synthetic_size // 10), shape, num_classes, seed + 1),
            tuple(str(c) for c in range(num_classes)), shape,
        )
    if not spec:
        raise ValueError("--data is empty; pass digits, synthetic or an ImageFolder root")
    return image_folder_split(spec, image_size or 224)


def class_fingerprint(classes: Sequence[str]) -> str:
    """Return a SHA-256 hex digest of the sorted class names, equal on ranks that agree.

    Example:
        >>> class_fingerprint(["dog", "cat"]) == class_fingerprint(["cat", "dog"])
        True
    """
    return hashlib.sha256("\n".join(sorted(classes)).encode("utf-8")).hexdigest()


def fingerprint_int64(fingerprint: str) -> int:
    """Fold a `class_fingerprint` into a non-negative int64, for a MIN/MAX allreduce check."""
    return int(fingerprint[:15], 16)


def _check_sizes(dataset_size: int, world_size: int, global_batch: int, partial: str) -> None:
    if partial not in PARTIAL_MODES:
        raise ValueError(f"partial must be one of {', '.join(PARTIAL_MODES)}, got {partial!r}")
    if world_size < 1 or global_batch < 1:
        raise ValueError(f"need world_size >= 1 and global_batch >= 1, got {world_size}, {global_batch}")
    if global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} is not divisible by {world_size} workers; pick a "
            f"global batch that is a multiple of {world_size}"
        )
    if dataset_size < 1:
        raise ValueError("the data set is empty; check --data")
    if partial != "even" and global_batch > dataset_size:
        raise ValueError(
            f"global batch {global_batch} ({world_size} workers x {global_batch // world_size}) "
            f"is larger than the {dataset_size} training samples, so an epoch has no full "
            f"batch; lower --batch-size to at most {dataset_size // world_size} per worker"
        )


def shard_batches(dataset_size: int, rank: int, world_size: int, global_batch: int, epoch: int,
                  seed: int = 0, shuffle: bool = True, partial: str = "drop") -> list[list[int]]:
    """Return this rank's batches (lists of sample indices) for one epoch.

    The epoch's order is a permutation drawn from (seed, epoch); global batch j is the slice
    [j B, (j + 1) B) of it and rank r takes the r-th of its world_size equal parts, so n ranks
    see exactly the batches one rank would see at n times the per-rank batch. The ragged end
    (fewer than B samples left) is handled the same way on every rank:
      "drop": skipped (it changes every epoch with the reshuffle); every rank gets N // B full
          batches, each kept sample once.
      "pad": filled up to B with the first samples of the permutation; ceil(N / B) full batches.
      "even": split as evenly as possible (sizes differ by at most 1); every sample exactly
          once, ceil(N / B) batches per rank. When fewer samples than ranks remain, some ranks
          get an EMPTY last batch: skip the forward pass there but still join the collectives.

    Raises:
        ValueError: see `ShardSampler`.
    """
    _check_sizes(dataset_size, world_size, global_batch, partial)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(dataset_size)
    else:
        order = np.arange(dataset_size)
    local = global_batch // world_size
    full, tail = divmod(dataset_size, global_batch)
    batches = [order[j * global_batch + rank * local:j * global_batch + (rank + 1) * local].tolist()
               for j in range(full)]
    if tail and partial == "pad":
        padded = np.concatenate([order[full * global_batch:], np.resize(order, global_batch - tail)])
        batches.append(padded[rank * local:(rank + 1) * local].tolist())
    elif tail and partial == "even":
        rest = order[full * global_batch:]
        cuts = [r * tail // world_size for r in range(world_size + 1)]
        batches.append(rest[cuts[rank]:cuts[rank + 1]].tolist())
    return batches


class ShardSampler:
    """A batch sampler (for DataLoader(batch_sampler=...)) over this rank's shard of an epoch.

    Call `set_epoch(epoch)` before each epoch, with start_batch=k to resume mid-epoch after
    k batches; `set_global_batch` follows a batch ramp. state_dict() holds only ints, for
    checkpoints. See `shard_batches` for the order and the partial-batch modes.

    Raises:
        ValueError: a global batch not divisible by world_size, larger than the data set
            (except in "even" mode), a rank outside 0..world_size-1, an unknown mode.
    """

    def __init__(self, dataset_size: int, rank: int, world_size: int, global_batch: int, *,
                 seed: int = 0, shuffle: bool = True, partial: str = "drop"):
        _check_sizes(dataset_size, world_size, global_batch, partial)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.dataset_size, self.rank, self.world_size = dataset_size, rank, world_size
        self.global_batch, self.seed, self.shuffle, self.partial = global_batch, seed, shuffle, partial
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        """Batches per rank in a whole epoch at the current global batch."""
        full, tail = divmod(self.dataset_size, self.global_batch)
        return full + (1 if tail and self.partial != "drop" else 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its shuffle) and the batch to start from (0, or k to resume)."""
        if epoch < 0 or not 0 <= start_batch <= self.num_batches:
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_batch <= {self.num_batches}, got "
                f"epoch={epoch}, start_batch={start_batch}"
            )
        self.epoch, self.start_batch = epoch, start_batch

    def set_global_batch(self, global_batch: int) -> None:
        """Change the global batch (a batch ramp) from the next epoch's iteration on."""
        _check_sizes(self.dataset_size, self.world_size, global_batch, self.partial)
        self.global_batch = global_batch

    def __iter__(self) -> Iterator[list[int]]:
        batches = shard_batches(self.dataset_size, self.rank, self.world_size, self.global_batch,
                                self.epoch, self.seed, self.shuffle, self.partial)
        return iter(batches[self.start_batch:])

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def state_dict(self) -> dict:
        """Return the position as ints: epoch, start_batch, global_batch, seed, dataset_size."""
        return {"epoch": self.epoch, "start_batch": self.start_batch,
                "global_batch": self.global_batch, "seed": self.seed,
                "dataset_size": self.dataset_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict`.

        Raises:
            ValueError: the checkpoint came from a different data set size or seed.
        """
        for key in ("dataset_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint sampler has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same --data and --seed"
                )
        self.set_global_batch(int(state["global_batch"]))
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))
