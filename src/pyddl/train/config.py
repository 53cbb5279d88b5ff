"""TrainConfig: every flag of `pyddl train` as one frozen dataclass, which is also the Python API.

Validation happens at construction, before any process starts, so a bad flag fails in the
launcher with a message instead of in N workers at once. No torch.distributed here.
The defaults train the small CNN on digits on 2 local workers (global batch 64) past 0.95.
The job flags (-np, --topology, --allreduce, ...) are `pyddl run`'s, added by the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from pyddl.comm.registry import ALGORITHM_CHOICES, CODECS
from pyddl.topology.spec import parse_topology
from pyddl.train.recipe import (
    DECAYS, Recipe, parse_batch_ramp, ramp_batch_at, validate_batch_ramp,
)

__all__ = [
    "ALLREDUCE_ALGORITHMS",
    "COMPRESSIONS",
    "DEFAULT_BATCH_SIZE",
    "DEVICES",
    "OPTIMIZERS",
    "TrainConfig",
    "add_train_arguments",
    "config_from_args",
]

ALLREDUCE_ALGORITHMS = ALGORITHM_CHOICES
COMPRESSIONS = CODECS
OPTIMIZERS = ("sgd", "lars")
DEVICES = ("auto", "cpu", "cuda")
# Goyal et al.'s 32 images per worker.
DEFAULT_BATCH_SIZE = 32
# `--data synthetic` by default: small enough that 5 epochs of the small CNN take well under a
# minute on 2 CPU cores (pass --image-size 224 --synthetic-classes 1000 for ImageNet's shape).
SYNTHETIC_SIZE, SYNTHETIC_CLASSES = 2_000, 10
# Goyal et al. warm up for 5 epochs of a 90-epoch run; short runs get a quarter of their length.
_GOYAL_WARMUP_EPOCHS = 5.0
_TYPES = {"int": (int, "an int"), "float": ((int, float), "a number"), "bool": (bool, "a bool"),
          "str": (str, "a string")}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; see `add_train_arguments` for each field's meaning.

    Example:
        >>> cfg = TrainConfig(workers=8, model="resnet50", data="/data/imagenet", epochs=90,
        ...                   decay="step", milestones=(30, 60, 80), weight_decay=1e-4)
        >>> cfg.global_batch_at(0), cfg.make_recipe(1_281_167).at(5, 0)[0]
        (256, 0.1)
    """

    workers: int = 2
    model: str = "small_cnn"
    data: str = "digits"
    epochs: int = 5
    batch_size: int | None = None
    base_lr: float = 0.1
    base_batch: int = 256
    warmup_epochs: float | None = None
    batch_ramp: tuple[tuple[int, int], ...] = ()
    decay: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    lars_eta: float = 0.001
    label_smoothing: float = 0.0
    allreduce: str | None = None
    topology: str | None = None
    compression: str = "none"
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    resume: bool = False
    allow_changes: bool = False
    seed: int = 0
    out: str | None = None
    max_steps_per_epoch: int | None = None
    stop_after_epoch: int | None = None
    synthetic_size: int = SYNTHETIC_SIZE
    synthetic_classes: int = SYNTHETIC_CLASSES
    image_size: int | None = None
    loader_workers: int = 0
    device: str = "auto"
    log_every_s: float = 10.0

    def __post_init__(self):
        self._check_types()
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        ramp = parse_batch_ramp(self.batch_ramp) if isinstance(self.batch_ramp, str) \
            else validate_batch_ramp(self.batch_ramp)
        object.__setattr__(self, "batch_ramp", ramp)
        self._check_values()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, _, optional = str(f.type).partition(" | ")
            if value is None and optional == "None":
                continue
            if f.name == "batch_ramp":
                check, expected = (tuple, list, str), "(epoch, batch) pairs or 'E:B,...'"
            elif f.name == "milestones":
                check, expected = (tuple, list), "a sequence of epochs"
            else:
                check, expected = _TYPES[kind]
            if not isinstance(value, check) or (kind != "bool" and isinstance(value, bool)):
                raise TypeError(f"TrainConfig.{f.name} must be {expected}, got {value!r}")

    def _check_values(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.workers >= 1, f"-np must be >= 1 worker, got {self.workers}")
        need(bool(self.model), "--model is empty; pass small_cnn, resnet50, ...")
        need(bool(self.data), "--data is empty; pass digits, synthetic or an ImageFolder root")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_ramp:
            need(self.batch_size is None,
                 "--batch-size and --batch-ramp are both set; the ramp gives the global batch "
                 "of every epoch, so drop --batch-size")
            odd = [b for _, b in self.batch_ramp if b % self.workers]
            need(not odd, f"--batch-ramp batches {odd} are not divisible by {self.workers} "
                 f"workers; use multiples of {self.workers}")
        else:
            need(self.batch_size is None or self.batch_size >= 1,
                 f"--batch-size (per worker) must be >= 1, got {self.batch_size}")
        need(self.base_lr > 0, f"--base-lr must be > 0, got {self.base_lr}")
        need(self.base_batch >= 1, f"--base-batch must be >= 1, got {self.base_batch}")
        need(self.warmup_epochs is None or 0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs must be in [0, --epochs={self.epochs}], got {self.warmup_epochs}")
        need(self.decay in DECAYS, f"--decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.decay == "step":
            need(bool(self.milestones),
                 f"--decay step needs --milestones, e.g. --milestones "
                 f"{','.join(str(max(1, self.epochs * k // 90)) for k in (30, 60, 80))} "
                 f"(Goyal et al.'s 30,60,80 of 90 epochs)")
        ms = self.milestones
        need(not ms or self.decay == "step", "--milestones only apply with --decay step")
        need(all(a < b for a, b in zip((0,) + ms, ms)) and all(m < self.epochs for m in ms),
             f"--milestones must increase strictly within 1..{self.epochs - 1}, got {list(ms)}")
        need(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        need(self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(not (self.optimizer == "lars" and self.nesterov),
             "--nesterov works with --optimizer sgd only; LARS uses heavy-ball momentum")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(not self.nesterov or self.momentum > 0, "--nesterov needs --momentum > 0")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.lars_eta > 0, f"--lars-eta must be > 0, got {self.lars_eta}")
        need(0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.allreduce is None or self.allreduce in ALLREDUCE_ALGORITHMS,
             f"--allreduce must be one of {', '.join(ALLREDUCE_ALGORITHMS)}, got {self.allreduce!r}")
        if self.topology is not None:
            parse_topology(self.topology, self.workers)
        need(self.compression in COMPRESSIONS,
             f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        need(self.keep_checkpoints >= 1,
             f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(not self.resume or bool(self.checkpoint_dir or self.out),
             "--resume needs to know where the checkpoints are: pass --checkpoint-dir DIR or "
             "the --out DIR of the run to continue")
        need(not self.allow_changes or self.resume,
             "--allow-changes applies to --resume (continue a run with new values); add --resume")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}")
        need(self.stop_after_epoch is None or 1 <= self.stop_after_epoch <= self.epochs,
             f"--stop-after-epoch must be in 1..--epochs={self.epochs}, got {self.stop_after_epoch}")
        need(self.synthetic_size >= 1 and self.synthetic_classes >= 1,
             f"--synthetic-size and --synthetic-classes must be >= 1, got "
             f"{self.synthetic_size}, {self.synthetic_classes}")
        need(self.image_size is None or self.image_size >= 1,
             f"--image-size must be >= 1, got {self.image_size}")
        need(self.loader_workers >= 0, f"--loader-workers must be >= 0, got {self.loader_workers}")
        need(self.device in DEVICES,
             f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.log_every_s >= 0, f"--log-every must be >= 0 seconds, got {self.log_every_s}")

    @property
    def effective_warmup_epochs(self) -> float:
        """Warmup length: the flag, else Goyal's 5 epochs capped at a quarter of the run."""
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        return min(_GOYAL_WARMUP_EPOCHS, self.epochs / 4)

    def global_batch_at(self, epoch: int) -> int:
        """Return the global batch (all workers) of `epoch`: the ramp's, else workers x batch."""
        if self.batch_ramp:
            return ramp_batch_at(self.batch_ramp, epoch)
        return self.workers * (self.batch_size or DEFAULT_BATCH_SIZE)

    def make_recipe(self, train_size: int) -> Recipe:
        """Build the learning-rate / batch schedule for a training set of `train_size` samples.

        Raises:
            ValueError: a global batch larger than the training set.
        """
        return Recipe(
            base_lr=self.base_lr, base_batch=self.base_batch, epochs=self.epochs,
            train_size=train_size,
            global_batch=0 if self.batch_ramp else self.global_batch_at(0),
            batch_ramp=self.batch_ramp, warmup_epochs=self.effective_warmup_epochs,
            decay=self.decay, milestones=self.milestones, gamma=self.gamma,
            max_steps_per_epoch=self.max_steps_per_epoch,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-friendly primitives (for summary.json and checkpoints)."""
        d = dataclasses.asdict(self)
        d["batch_ramp"] = [list(p) for p in self.batch_ramp]
        d["milestones"] = list(self.milestones)
        return d


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs such as 30,60,80, got {text!r}") from None


def _ramp(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return parse_batch_ramp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training flags of TrainConfig to `parser` (defaults taken from TrainConfig).

    The job flags -np (workers), --topology and --allreduce are `pyddl run`'s own
    (`pyddl.cli.run.add_job_flags`), so every launching command spells them the same way;
    `config_from_args` reads them from the namespace when they are there.
    """
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    g = parser.add_argument_group("training run")
    g.add_argument("--model", default=d["model"], metavar="M",
                   help="small_cnn or a torchvision classifier: resnet50, resnet101, ... "
                   "(default %(default)s)")
    g.add_argument("--data", default=d["data"], metavar="D",
                   help="digits, synthetic, or an ImageFolder root with train/ and val/ "
                   "(default %(default)s)")
    g.add_argument("--epochs", type=int, default=d["epochs"], metavar="E",
                   help="epochs (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], metavar="B",
                   help=f"images per worker per step (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--seed", type=int, default=d["seed"], metavar="S",
                   help="seed of init, shuffles and augmentation (default %(default)s)")
    g.add_argument("--out", default=d["out"], metavar="DIR",
                   help="output folder (default: a new folder under ./runs)")
    g.add_argument("--device", choices=DEVICES, default=d["device"],
                   help="auto: one GPU per worker if CUDA is present, else CPU")
    g.add_argument("--max-steps-per-epoch", type=int, default=d["max_steps_per_epoch"],
                   metavar="K", help="cap steps per epoch (quick tests)")
    g.add_argument("--stop-after-epoch", type=int, default=d["stop_after_epoch"], metavar="K",
                   help="stop after epoch K as if interrupted (the checkpoint stays; continue "
                   "with --resume), e.g. to fit a time-limited allocation")
    g.add_argument("--log-every", dest="log_every_s", type=float, default=d["log_every_s"],
                   metavar="SEC", help="progress line period when stdout is not a terminal")

    r = parser.add_argument_group("recipe (Goyal et al. 2017)")
    r.add_argument("--base-lr", type=float, default=d["base_lr"], metavar="L",
                   help="lr at --base-batch; lr = L x global batch / base batch")
    r.add_argument("--base-batch", type=int, default=d["base_batch"], metavar="B0",
                   help="batch --base-lr was tuned for (default %(default)s)")
    r.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"], metavar="W",
                   help="gradual warmup length (default 5, at most a quarter of --epochs)")
    r.add_argument("--batch-ramp", type=_ramp, default=d["batch_ramp"], metavar="E:B,...",
                   help="global batch by epoch, e.g. 0:256,5:1024,10:4096 (replaces --batch-size)")
    r.add_argument("--decay", choices=DECAYS, default=d["decay"],
                   help="after warmup (default %(default)s)")
    r.add_argument("--milestones", type=_int_list, default=d["milestones"], metavar="E1,E2",
                   help="epochs where step decay multiplies the lr by --gamma")
    r.add_argument("--gamma", type=float, default=d["gamma"], help="step decay factor")
    r.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"])
    r.add_argument("--momentum", type=float, default=d["momentum"])
    r.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd only)")
    r.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="on weights only, never on BN or bias (default %(default)s)")
    r.add_argument("--lars-eta", type=float, default=d["lars_eta"],
                   help="LARS trust coefficient (default %(default)s)")
    r.add_argument("--label-smoothing", type=float, default=d["label_smoothing"], metavar="EPS")

    c = parser.add_argument_group("communication")
    c.add_argument("--compression", choices=COMPRESSIONS, default=d["compression"],
                   help="gradient wire format (default %(default)s)")

    k = parser.add_argument_group("checkpoints")
    k.add_argument("--checkpoint-dir", default=d["checkpoint_dir"], metavar="DIR",
                   help="default: OUT/checkpoints")
    k.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"], metavar="K")
    k.add_argument("--resume", action="store_true", help="continue from the last good checkpoint")
    k.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although -np, --epochs, the batch or --base-lr differ "
                   "from the checkpoint's run (the recipe follows the new values)")

    s = parser.add_argument_group("data details")
    s.add_argument("--synthetic-size", type=int, default=d["synthetic_size"], metavar="N",
                   help="synthetic training images (default %(default)s; a tenth as many test images)")
    s.add_argument("--synthetic-classes", type=int, default=d["synthetic_classes"], metavar="K",
                   help="synthetic classes (default %(default)s)")
    s.add_argument("--image-size", type=int, default=d["image_size"], metavar="PX",
                   help="side of the images fed to the model: ImageFolder images are cropped and resized "
                   "to it (default 224), synthetic ones drawn at it (default 32)")
    s.add_argument("--loader-workers", type=int, default=d["loader_workers"], metavar="N",
                   help="DataLoader processes per worker (default %(default)s)")


# TrainConfig field -> its namespace attribute where the job flags name it differently.
_JOB_FLAG_DEST = {"workers": "nproc"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a TrainConfig from a namespace parsed with `add_train_arguments`' flags (and the
    job flags, when present; an absent or None -np keeps the default of 2 workers).

    Raises:
        ValueError, TypeError: as TrainConfig's validation.
    """
    kwargs = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, _JOB_FLAG_DEST.get(f.name, f.name), None)
        if value is not None:  # every optional field defaults to None, so None means "unset"
            kwargs[f.name] = value
    return TrainConfig(**kwargs)
