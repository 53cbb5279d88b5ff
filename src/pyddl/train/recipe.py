"""The large-minibatch recipe: learning-rate scaling, gradual warmup, decay, batch ramp.

Goyal et al. 2017 (arXiv 1706.02677): linear scaling, per-iteration gradual warmup. The
schedule is plain math on a fractional-epoch clock, so every rank computes the same value with
no communication, and any framework can drive it (pure: no torch). The optimizer side (LARS,
parameter groups, the loss) is in pyddl.train.optim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "DECAYS",
    "Recipe",
    "cosine_decay_factor",
    "parse_batch_ramp",
    "ramp_batch_at",
    "scaled_lr",
    "step_decay_factor",
    "steps_per_epoch",
    "validate_batch_ramp",
    "warmup_lr",
]

DECAYS = ("none", "step", "cosine")


def scaled_lr(base_lr: float, global_batch: int, base_batch: int = 256) -> float:
    """Apply the linear scaling rule: lr = base_lr x global_batch / base_batch.

    Args:
        base_lr: the learning rate that works at `base_batch` (0.1 for ResNet-50 at 256).
        global_batch: images per optimizer step summed over all workers.
        base_batch: the batch `base_lr` was tuned for.

    Returns:
        The learning rate for `global_batch`.

    Raises:
        ValueError: a non-positive batch or a negative learning rate.

    Example:
        >>> scaled_lr(0.1, 8192)
        3.2
    """
    if global_batch < 1 or base_batch < 1:
        raise ValueError(
            f"batches must be positive, got global_batch={global_batch}, base_batch={base_batch}"
        )
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    return base_lr * global_batch / base_batch


def warmup_lr(progress_epochs: float, warmup_epochs: float, start_lr: float, target_lr: float) -> float:
    """Interpolate linearly from `start_lr` to `target_lr` over `warmup_epochs`.

    Evaluated at progress_epochs = epoch + step / steps_per_epoch this adds the same increment
    every iteration, Goyal et al.'s gradual warmup. Past the warmup it returns `target_lr`.

    Args:
        progress_epochs: fractional epochs done (>= 0).
        warmup_epochs: length of the warmup; 0 means none.
        start_lr: rate at progress 0.
        target_lr: rate reached at progress `warmup_epochs`.

    Returns:
        The warmed-up learning rate.

    Example:
        >>> round(warmup_lr(2.5, 5, 0.1, 3.2), 6)
        1.65
    """
    if warmup_epochs <= 0 or progress_epochs >= warmup_epochs:
        return target_lr
    return start_lr + (target_lr - start_lr) * max(progress_epochs, 0.0) / warmup_epochs


def step_decay_factor(epoch: int, milestones: Iterable[int], gamma: float) -> float:
    """Return gamma ** (number of milestones already reached at `epoch`).

    Example:
        >>> round(step_decay_factor(65, (30, 60, 80), 0.1), 6)   # two milestones passed
        0.01
    """
    return gamma ** sum(1 for m in milestones if epoch >= m)


def cosine_decay_factor(progress: float) -> float:
    """Return 0.5 (1 + cos(pi p)) for p = `progress` clipped to [0, 1]: 1 at the start, 0 at the end."""
    p = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def parse_batch_ramp(spec: str) -> tuple[tuple[int, int], ...]:
    """Parse "EPOCH:GLOBAL_BATCH,..." such as "0:256,5:1024,10:4096" into ((0, 256), ...).

    Args:
        spec: comma-separated epoch:batch pairs; epochs strictly increasing and starting at 0.

    Returns:
        The pairs, in order; () for an empty spec.

    Raises:
        ValueError: malformed pairs, a first epoch other than 0, epochs not increasing, or a
            batch below 1.
    """
    spec = spec.strip()
    if not spec:
        return ()
    pairs = []
    for item in spec.split(","):
        epoch_s, sep, batch_s = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(epoch_s), int(batch_s)))
        except ValueError:
            raise ValueError(
                f"batch ramp entry {item.strip()!r} is not EPOCH:GLOBAL_BATCH; "
                f"write e.g. --batch-ramp 0:256,5:1024,10:4096"
            ) from None
    return validate_batch_ramp(pairs)


def validate_batch_ramp(pairs: Iterable[Iterable[int]]) -> tuple[tuple[int, int], ...]:
    """Check a ramp given as (epoch, global_batch) pairs and return it as a tuple of int pairs.

    Raises:
        ValueError: the first epoch is not 0, epochs do not increase, or a batch is below 1.
    """
    ramp = tuple((int(e), int(b)) for e, b in pairs)
    if not ramp:
        return ()
    if ramp[0][0] != 0:
        raise ValueError(
            f"batch ramp must start at epoch 0, got {ramp[0][0]}; prepend 0:<first batch>"
        )
    epochs = [e for e, _ in ramp]
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise ValueError(f"batch ramp epochs must strictly increase, got {epochs}")
    bad = [b for _, b in ramp if b < 1]
    if bad:
        raise ValueError(f"batch ramp batches must be >= 1, got {bad}")
    return ramp


def ramp_batch_at(ramp: tuple[tuple[int, int], ...], epoch: int) -> int:
    """Return the global batch the ramp gives at `epoch` (the last entry starting at or before it)."""
    if not ramp:
        raise ValueError("empty batch ramp; pass at least one EPOCH:GLOBAL_BATCH pair")
    batch = ramp[0][1]
    for start, value in ramp:
        if start <= epoch:
            batch = value
    return batch


def steps_per_epoch(train_size: int, global_batch: int, drop_last: bool = True) -> int:
    """Count optimizer steps in one epoch: floor(N / B) with drop_last, else ceil(N / B)."""
    if drop_last:
        return train_size // global_batch
    return -(-train_size // global_batch)


@dataclass(frozen=True)
class Recipe:
    """Learning rate and global batch at every (epoch, step) of a run.

    lr(t) = warmup(t) x decay(t), with t = epoch + step / steps_in_epoch(epoch); the warmup
    starts at min(base_lr, scaled) — Goyal et al. warm up from the small-batch rate, and a
    global batch below base_batch has nothing to warm up to — and ends at the linearly scaled
    rate of the current global batch. With a batch ramp the target follows each new batch.

    Example:
        >>> r = Recipe(base_lr=0.1, base_batch=256, epochs=90, train_size=1_281_167,
        ...            global_batch=8192, warmup_epochs=5, decay="step", milestones=(30, 60, 80))
        >>> r.at(0, 0), r.at(5, 0)
        ((0.1, 8192), (3.2, 8192))
    """

    base_lr: float
    base_batch: int
    epochs: int
    train_size: int
    global_batch: int = 0
    batch_ramp: tuple[tuple[int, int], ...] = ()
    warmup_epochs: float = 0.0
    decay: str = "none"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    drop_last: bool = True
    max_steps_per_epoch: int | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.base_batch < 1 or self.base_lr < 0:
            raise ValueError(
                f"need base_batch >= 1 and base_lr >= 0, got {self.base_batch}, {self.base_lr}"
            )
        object.__setattr__(self, "batch_ramp", validate_batch_ramp(self.batch_ramp))
        if bool(self.batch_ramp) == (self.global_batch > 0):
            raise ValueError(
                "give exactly one of global_batch (constant) or batch_ramp, got "
                f"global_batch={self.global_batch}, batch_ramp={self.batch_ramp!r}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.decay == "step" and not self.milestones:
            raise ValueError("step decay needs milestones, e.g. (30, 60, 80) for 90 epochs")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")
        for epoch in range(self.epochs):
            if self.steps_in_epoch(epoch) == 0:
                raise ValueError(
                    f"global batch {self.global_batch_at(epoch)} at epoch {epoch} is larger than "
                    f"the {self.train_size} training samples, so the epoch has no full batch; "
                    f"lower --batch-size (or the --batch-ramp entries)"
                )

    def global_batch_at(self, epoch: int) -> int:
        """Return the global batch used during `epoch`."""
        if self.batch_ramp:
            return ramp_batch_at(self.batch_ramp, epoch)
        return self.global_batch

    def steps_in_epoch(self, epoch: int) -> int:
        """Return the number of optimizer steps in `epoch` (after any max_steps_per_epoch cap)."""
        n = steps_per_epoch(self.train_size, self.global_batch_at(epoch), self.drop_last)
        if self.max_steps_per_epoch is not None:
            n = min(n, self.max_steps_per_epoch)
        return n

    def total_steps(self) -> int:
        """Return the optimizer steps of the whole run."""
        return sum(self.steps_in_epoch(e) for e in range(self.epochs))

    def at(self, epoch: int, step: int) -> tuple[float, int]:
        """Return (learning rate, global batch) for `step` (0-based) of `epoch` (0-based).

        Raises:
            ValueError: epoch or step outside the run.
        """
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} is outside the run's 0..{self.epochs - 1}")
        steps = self.steps_in_epoch(epoch)
        if not 0 <= step < steps:
            raise ValueError(f"step {step} is outside epoch {epoch}'s 0..{steps - 1}")
        batch = self.global_batch_at(epoch)
        target = scaled_lr(self.base_lr, batch, self.base_batch)
        t = epoch + step / steps
        lr = warmup_lr(t, self.warmup_epochs, min(self.base_lr, target), target)
        if self.decay == "step":
            lr *= step_decay_factor(epoch, self.milestones, self.gamma)
        elif self.decay == "cosine" and self.epochs > self.warmup_epochs:
            lr *= cosine_decay_factor((t - self.warmup_epochs) / (self.epochs - self.warmup_epochs))
        return lr, batch
