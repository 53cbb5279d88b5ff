"""ElasticSampler: Horovod's sampler that shards a dataset over the ranks and, after the job
changes size, re-shards only the samples this epoch has not processed yet.

The arithmetic (`shard`) is pure and matches Horovod's: one seeded shuffle per epoch, the
processed prefix dropped, the rest padded to a multiple of the size and dealt round-robin.
"""

from __future__ import annotations

import math
import random

import torch.utils.data

__all__ = ["ElasticSampler", "shard"]


def shard(n: int, processed: int, epoch: int, seed: int, shuffle: bool, rank: int, size: int) -> list[int]:
    """The indices rank `rank` of `size` reads from an `n`-sample dataset, the first
    `processed` samples of this epoch's order being done.

    Every rank gets ceil(remaining / size) indices; the last ones repeat the first remaining
    samples to even the shards out, as torch's DistributedSampler does.

    Example:
        >>> shard(10, 4, epoch=0, seed=0, shuffle=False, rank=1, size=2)
        [5, 7, 9]
    """
    order = list(range(n))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    remaining = order[processed:]
    per_rank = math.ceil(len(remaining) / size)
    padded = remaining + remaining[:per_rank * size - len(remaining)]
    return padded[rank::size]


class ElasticSampler(torch.utils.data.Sampler):
    """Shard `dataset` over the job's ranks; re-shard what is left after a reset.

    Put it in the `TorchState`, call `record_batch` after each batch (so a commit knows how
    far the epoch got), and `set_epoch(epoch + 1)` at the end of each epoch. It reads
    `hvd.rank()` and `hvd.size()`, so `hvd.init()` comes first.

    Args:
        dataset: anything with a constant len().
        shuffle: shuffle once per epoch (seed + epoch), the same order on every rank.
        seed: the shuffle's seed; identical on every rank.

    Example:
        >>> sampler = hvd.elastic.ElasticSampler(train_set)
        >>> loader = torch.utils.data.DataLoader(train_set, batch_size=32, sampler=sampler)
        >>> state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0)
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = 0
        self.processed_num = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` with nothing processed. Call it at the end of an epoch, so a
        commit made in the middle of one does not replay the samples already seen."""
        self.epoch = epoch
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Count a batch of `batch_size` samples as processed on every rank."""
        self.processed_num += batch_size * self.num_replicas

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, processed_num=self.processed_num)

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self.processed_num = state_dict["processed_num"]
        self.reset()

    def reset(self) -> None:
        """Shard the rest of the epoch over the job as it is now (rank, size)."""
        from pyddl.torch.ops import rank, size

        self.rank, self.num_replicas = rank(), size()
        self.indices = shard(len(self.dataset), self.processed_num, self.epoch, self.seed, self.shuffle,
                             self.rank, self.num_replicas)
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(list(self.indices))

    def __len__(self) -> int:
        return self.num_samples
