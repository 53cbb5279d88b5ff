"""The distributed training loop of `pyddl train`: one call per rank, `train(TrainConfig(...))`.

Synchronous data parallelism (Goyal et al. 2017): every rank holds the whole model, reads its own
shard, and DistributedOptimizer averages gradients while backward runs. Start-up failures and
rank disagreements end on every rank at once (one allgather), so bad input never leaves a rank
waiting in a collective. Checkpoints are written by rank 0 after each epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import pyddl
from pyddl import env as _env
from pyddl.errors import PyddlError
from pyddl.torch.compression import Compression
from pyddl.torch.functions import broadcast_parameters
from pyddl.torch.optimizer import DistributedOptimizer
from pyddl.train import checkpoint as ckpt
from pyddl.train.config import DEFAULT_BATCH_SIZE, TrainConfig
from pyddl.train.data import DataSplit, ShardSampler, class_fingerprint, fingerprint_int64, load_data, shard_batches
from pyddl.train.models import build_model
from pyddl.train.optim import build_optimizer, make_criterion, set_lr
from pyddl.train.recipe import Recipe
from pyddl.train.report import (
    MetricsWriter, ProgressBar, format_duration, plot_curves, read_metrics, summary_text,
    topk_correct, write_summary,
)

__all__ = ["NonFiniteLossError", "RunResult", "backend_for", "check_inputs", "resume_changes", "train"]

# Images per worker per evaluation batch: no gradients are kept, so it can exceed training's.
_EVAL_BATCH = 256
# Start-up report each rank shares: failed?, class fingerprint, classes, train size, test size,
# checkpoint index loaded (-1: none).
_FAILED, _FINGERPRINT, _CLASSES, _TRAIN, _TEST, _RESUMED = range(6)


class NonFiniteLossError(PyddlError):
    """The loss became NaN or Inf; training stopped before applying that step."""


@dataclass
class RunResult:
    """What `train` returns on every rank: rank 0's summary (the same numbers on all ranks),
    the trained model (identical on all ranks) and the output folder."""

    summary: dict[str, Any]
    model: nn.Module
    out_dir: Path


def backend_for(device: str) -> str | None:
    """Return the process-group backend --device asks for (None: NCCL with CUDA, else Gloo)."""
    return "gloo" if device == "cpu" else None


def _device(cfg: TrainConfig) -> torch.device:
    dev = pyddl.device()
    if cfg.device == "cuda" and dev.type != "cuda":
        raise ValueError("--device cuda, but pyddl runs on the CPU (no CUDA device visible, or "
                         "pyddl.init(backend='gloo') was called); use --device auto or cpu")
    if cfg.device == "cpu" and dev.type != "cpu":
        raise ValueError("--device cpu, but pyddl was initialised with NCCL on the GPU; call "
                         "pyddl.init(backend='gloo') first, or use --device auto")
    return dev


def _open_inputs(cfg: TrainConfig, model: nn.Module | None) -> tuple[DataSplit, nn.Module, Recipe]:
    data = load_data(cfg.data, synthetic_size=cfg.synthetic_size, image_size=cfg.image_size,
                     num_classes=cfg.synthetic_classes, seed=cfg.seed)
    recipe = cfg.make_recipe(len(data.train))
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data.num_classes, data.input_shape)
    return data, model, recipe


def _checkpoints(cfg: TrainConfig, out: str | None) -> ckpt.CheckpointManager | None:
    directory = cfg.checkpoint_dir or (str(Path(out) / "checkpoints") if out else None)
    return ckpt.CheckpointManager(directory, cfg.keep_checkpoints) if directory else None


def _check_fresh_start(cfg: TrainConfig, manager: ckpt.CheckpointManager | None) -> None:
    if cfg.resume:
        if manager is None or not manager.indices():
            where = manager.directory if manager else "(no --out or --checkpoint-dir)"
            raise ValueError(f"--resume: no checkpoint in {where}; check --out/--checkpoint-dir, "
                             f"or drop --resume to start a new run")
    elif manager is not None and manager.indices():
        raise ValueError(
            f"{manager.directory} already holds checkpoints of a run "
            f"({manager.path(manager.indices()[-1]).name}); pass --resume to continue it, or "
            f"another --out/--checkpoint-dir to start a new one (nothing was overwritten)")


# What a resumed run may not change without --allow-changes: flag -> how to read it from a
# TrainConfig's dict (a checkpoint's extra["config"] or cfg.to_dict()).
_RESUME_KEYS = {
    "-np": lambda d: d.get("workers"),
    "--epochs": lambda d: d.get("epochs"),
    "--batch-size": lambda d: d.get("batch_size") or DEFAULT_BATCH_SIZE,
    "--batch-ramp": lambda d: ",".join(f"{e}:{b}" for e, b in d.get("batch_ramp") or ()) or "none",
    "--base-lr": lambda d: d.get("base_lr"),
}


def resume_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """Name what `cfg` changes from the config a checkpoint was written with, e.g.
    ["--epochs 3 -> 5"]; empty when it continues the same run."""
    now = cfg.to_dict()
    return [f"{flag} {get(saved)} -> {get(now)}" for flag, get in _RESUME_KEYS.items()
            if get(saved) != get(now)]


def _check_resume_changes(cfg: TrainConfig, path: Path, state: dict, allowed: bool) -> str:
    """Refuse a resume whose run changed unless `allowed`; return what to announce ("" if
    nothing changed)."""
    # A checkpoint without the config of its run (written by other code) cannot be compared.
    changes = resume_changes(state.get("extra", {}).get("config") or cfg.to_dict(), cfg)
    if not changes:
        return ""
    epoch = int(state["position"]["epoch"])
    if not allowed:
        raise ValueError(f"--resume: {path} was written by a run with other values ({', '.join(changes)}); "
                         f"resume with the values of that run, or add --allow-changes to continue from "
                         f"epoch {epoch} with the new ones")
    return (f"pyddl train: resuming {path} with changes ({', '.join(changes)}): from epoch {epoch} on, "
            f"the global batch, the learning rate and its schedule follow the new values")


def _check_writable(flag: str, folder: str) -> None:
    # Created now as the run would create it, so that a folder that cannot be written ends
    # the command here rather than in every worker after the data is loaded.
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(f"{flag} {folder}: not a folder; give a folder you can write to")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot write there ({err.strerror}); give a folder "
                         f"you can write to") from None


def check_inputs(cfg: TrainConfig) -> None:
    """Open the data, build the model and the recipe once, as every worker will, and check
    the checkpoint and output folders; `pyddl train` calls this before it starts any worker.

    Raises:
        ValueError: a missing or empty data folder, an unknown model, a batch that does not
            fit the data set, --resume without checkpoints or with other values than the
            checkpoint's run (unless --allow-changes), checkpoints a new run would overwrite,
            or an output folder that cannot be written.
        ImportError: an optional dependency the data or model needs.
    """
    _open_inputs(cfg, None)
    manager = _checkpoints(cfg, cfg.out)
    _check_fresh_start(cfg, manager)
    if cfg.resume:
        index, state = manager.load_latest()
        if state is not None:
            _check_resume_changes(cfg, manager.path(index), state, cfg.allow_changes)
    for flag, folder in (("--out", cfg.out), ("--checkpoint-dir", cfg.checkpoint_dir)):
        if folder is not None:
            _check_writable(flag, folder)


def _seed_epoch(seed: int, rank: int, epoch: int) -> None:
    # Each (seed, rank, epoch) gets its own streams for augmentation, dropout and the
    # DataLoader's worker seeds, so a run resumed at an epoch boundary replays exactly, on
    # every rank, without per-rank RNG state in rank 0's checkpoint (part 1's note 2).
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def _broadcast_text(text: str, device: torch.device) -> str:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    length = pyddl.broadcast_(torch.tensor([data.numel()], dtype=torch.int64, device=device), 0)
    if pyddl.rank() != 0:
        data = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    return bytes(pyddl.broadcast_(data, 0).cpu().tolist()).decode()


def new_out_dir(cfg: TrainConfig) -> Path:
    """Create and return a new run folder under ./runs named after the time, model and data."""
    stem = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{Path(cfg.data).name}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    path.mkdir(parents=True)
    return path


def _restarts(restart: int, state: dict | None, resumed_from: Path | None) -> list[dict]:
    """The restarts of this run so far: the checkpoint's record plus this one, which names the
    failure the launcher reported (PYDDL_RESTART_REASON) and where training goes on from."""
    from pyddl.config import PYDDL_RESTART_REASON

    earlier = list((state or {}).get("extra", {}).get("restarts", []))
    epoch = int(state["position"]["epoch"]) if state else 0
    return earlier + [{"restart": restart, "failure": os.environ.get(PYDDL_RESTART_REASON),
                       "resumed_from": str(resumed_from) if resumed_from else None, "epoch": epoch}]


def _describe_groups(values: list[int], name) -> str:
    groups: dict[int, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {name(v, rs[0])}"
                     for v, rs in groups.items())


def _agree(reports: torch.Tensor, error: BaseException | None) -> None:
    """Raise the same way on every rank if start-up failed anywhere or the ranks disagree."""
    rows = reports.tolist()
    failed = [r for r, row in enumerate(rows) if row[_FAILED]]
    if error is not None:
        raise error
    if failed:
        raise PyddlError(f"start-up failed on rank(s) {', '.join(map(str, failed))} (their error is "
                         f"printed there); this rank stops too")
    col = {k: [row[k] for row in rows] for k in range(len(rows[0]))}
    if len(set(col[_FINGERPRINT])) > 1 or len(set(col[_CLASSES])) > 1:
        detail = _describe_groups(col[_FINGERPRINT],
                                  lambda v, r: f"{rows[r][_CLASSES]} classes (fingerprint {v:x})")
        raise ValueError(f"the class folders differ across ranks ({detail}); every rank must see "
                         f"the same class sub-folders under train/ and val/ (copy the same data "
                         f"set to every server)")
    for key, what in ((_TRAIN, "training"), (_TEST, "test")):
        if len(set(col[key])) > 1:
            raise ValueError(f"the {what} set differs in size across ranks "
                             f"({_describe_groups(col[key], lambda v, r: f'{v} images')}); every "
                             f"rank must read the same data set")
    if len(set(col[_RESUMED])) > 1:
        raise ValueError(f"ranks resumed from different checkpoints "
                         f"({_describe_groups(col[_RESUMED], lambda v, r: f'checkpoint {v}')}); "
                         f"--checkpoint-dir must be one folder every rank reads (a shared file "
                         f"system)")


class _Run:
    """One rank's training run; `train` builds it and calls `run`."""

    def __init__(self, cfg: TrainConfig, model: nn.Module | None):
        self.rank, self.world = pyddl.rank(), pyddl.size()
        self.started = time.perf_counter()
        self.device = pyddl.device()
        error, report, state, self.resumed_from, self.changes = None, [0] * 6, None, None, ""
        self.restarts: list[dict] = []  # the job's restarts so far (--max-restarts), for the summary
        report[_RESUMED] = -1
        try:
            self.cfg = cfg = dataclasses.replace(cfg, workers=self.world)
            self.device = _device(cfg)
            self.data, self.model, self.recipe = _open_inputs(cfg, model)
            self.model_name = cfg.model if model is None else type(model).__name__
            manager = _checkpoints(cfg, cfg.out)
            restarted = _env.read_job_env().restart_count
            if not cfg.resume and manager is not None and manager.indices() and restarted:
                # The launcher restarted the workers after a failure (--max-restarts): go on
                # from the last checkpoint instead of refusing the folder.
                self.cfg = cfg = dataclasses.replace(cfg, resume=True)
            _check_fresh_start(cfg, manager)
            if cfg.resume:
                index, state = manager.load_latest()
                if state is None:
                    if not restarted:
                        raise ValueError(f"--resume: no checkpoint in {manager.directory} passed its "
                                         f"check (see the warnings above); drop --resume to start anew")
                    # A restart after a crash that left no good checkpoint (e.g. during the
                    # first write): nothing to go on from, so the attempt starts over.
                    self.cfg = cfg = dataclasses.replace(cfg, resume=False)
                    if self.rank == 0:
                        print(f"pyddl train: restart {restarted}: no checkpoint in {manager.directory} "
                              "passed its check (see the warnings above); starting from scratch",
                              file=sys.stderr, flush=True)
                else:
                    report[_RESUMED] = index
                    self.resumed_from = manager.path(index)
                    # A restart may change the number of workers (--nnodes MIN:MAX): go on.
                    self.changes = _check_resume_changes(cfg, self.resumed_from, state,
                                                         cfg.allow_changes or bool(restarted))
            if restarted:
                self.restarts = _restarts(restarted, state, self.resumed_from)
            fp = class_fingerprint(self.data.classes)
            report[_FINGERPRINT] = fingerprint_int64(fp)
            report[_CLASSES] = self.data.num_classes
            report[_TRAIN], report[_TEST] = len(self.data.train), len(self.data.test)
        except Exception as exc:  # shared with the other ranks first, then raised
            error, report[_FAILED] = exc, 1
        reports = pyddl.allgather(torch.tensor([report], dtype=torch.int64, device=self.device))
        _agree(reports.cpu(), error)
        self.out = Path(cfg.out) if cfg.out else None
        if self.out is None:
            name = str(new_out_dir(cfg)) if self.rank == 0 else ""
            self.out = Path(_broadcast_text(name, self.device) if self.world > 1 else name)
        self.manager = _checkpoints(cfg, str(self.out))
        if self.rank == 0:
            # A worker killed while saving (--max-restarts, a crash) leaves its temporary.
            for path in self.manager.remove_stale_temps():
                print(f"pyddl train: removed {path}, left by an interrupted save", file=sys.stderr, flush=True)
        self._build(state)

    def _build(self, state: dict | None) -> None:
        cfg = self.cfg
        self.model.to(self.device)
        base = build_optimizer(cfg.optimizer, self.model, 0.0, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                               lars_eta=cfg.lars_eta)
        self.sampler = ShardSampler(len(self.data.train), self.rank, self.world,
                                    self.recipe.global_batch_at(0), seed=cfg.seed)
        self.position = {"epoch": 0, "step": 0, "global_step": 0}
        self.totals = {"wall_s": 0.0, "train_s": 0.0, "train_images": 0}
        self.last_checkpoint = None
        if state is not None:
            if self.changes:
                # The sampler takes the new global batch (-np, --batch-size may have changed).
                epoch = min(int(state["position"]["epoch"]), cfg.epochs - 1)
                state = dict(state, sampler=dict(state["sampler"],
                                                 global_batch=self.recipe.global_batch_at(epoch)))
                self._log(self.changes)
            # The RNGs are reseeded per epoch (_seed_epoch), so rank 0's saved state is not needed.
            try:
                self.position = ckpt.apply_state(state, self.model, base, sampler=self.sampler,
                                                 restore_rng=False)
            except RuntimeError as exc:  # load_state_dict: missing, unexpected or resized keys
                raise ValueError(f"{self.resumed_from} does not fit this model ({exc}); resume "
                                 f"with the --model and --data of the run that wrote it") from None
            self.totals.update(state.get("extra", {}).get("totals", {}))
            self.last_checkpoint = self.resumed_from
        broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.opt = DistributedOptimizer(base, named_parameters=self.model.named_parameters(),
                                        compression=getattr(Compression, cfg.compression),
                                        algorithm=cfg.allreduce)
        self.criterion = make_criterion(cfg.label_smoothing)

    def _log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def _restart_note(self) -> str:
        if not self.restarts:
            return ""
        last = self.restarts[-1]
        failure = f" after {last['failure']}" if last["failure"] else ""
        return f"restart {last['restart']}{failure}: "

    def run(self) -> RunResult:
        cfg, recipe = self.cfg, self.recipe
        start_epoch = self.position["epoch"]
        self.metrics = MetricsWriter(self.out / "metrics.jsonl",
                                     resume_epoch=start_epoch if cfg.resume else None) \
            if self.rank == 0 else None
        gb = recipe.global_batch_at(min(start_epoch, cfg.epochs - 1))
        lr0 = recipe.at(min(start_epoch, cfg.epochs - 1), 0)[0]
        shape = "x".join(map(str, self.data.input_shape))
        resize = f", {self.data.resize}" if self.data.resize else ""
        self._log(
            f"pyddl train: {self.model_name} on {cfg.data} ({len(self.data.train)} train / "
            f"{len(self.data.test)} test images of {shape}{resize}, {self.data.num_classes} "
            f"classes), {self.world} "
            f"worker(s) x {gb // self.world} = global batch {gb}, {cfg.epochs} epochs, lr "
            f"{cfg.base_lr:g} x {gb}/{cfg.base_batch} = {cfg.base_lr * gb / cfg.base_batch:.4g} "
            f"after {cfg.effective_warmup_epochs:g} warmup epochs; writing to {self.out}"
            + (f"\n{self._restart_note()}resuming from {self.last_checkpoint} at epoch {start_epoch} "
               f"(lr {lr0:.4g})" if cfg.resume else ""))
        self.bar = ProgressBar(recipe.total_steps(), start_step=self.position["global_step"],
                               enabled=self.rank == 0, every_s=cfg.log_every_s)
        evaluated = None
        for epoch in range(start_epoch, cfg.epochs):
            loss, lr, images, seconds = self._train_epoch(epoch)
            evaluated = self._end_epoch(epoch, loss, lr, images, seconds)
            if cfg.stop_after_epoch == epoch + 1 and epoch + 1 < cfg.epochs:
                self.bar.close()
                self._log(f"stopped after epoch {epoch + 1} as asked (--stop-after-epoch); "
                          f"continue with: pyddl train ... --resume --out {self.out}")
                summary = dict(evaluated, stopped_after_epoch=epoch + 1)
                break
        else:
            self.bar.close()
            if evaluated is None:  # resumed a finished run: only the final numbers to report
                evaluated = dict(zip(("top1", "top5", "test_loss"), self._evaluate()))
            summary = self._finish(evaluated)
        # Rank 0's files (checkpoint, summary) are complete on every rank's return, so a
        # script may resume or read them right away.
        pyddl.barrier()
        return RunResult(summary, self.model, self.out)

    def _train_epoch(self, epoch: int) -> tuple[float, float, int, float]:
        cfg, recipe = self.cfg, self.recipe
        _seed_epoch(cfg.seed, self.rank, epoch)
        gb, steps = recipe.global_batch_at(epoch), recipe.steps_in_epoch(epoch)
        # A batch ramp changes the global batch, hence each worker's share, at epoch starts.
        self.sampler.set_global_batch(gb)
        self.sampler.set_epoch(epoch)
        batches = list(self.sampler)[:steps]
        loader = DataLoader(self.data.train, batch_sampler=batches, num_workers=cfg.loader_workers,
                            pin_memory=self.device.type == "cuda")
        self.model.train()
        losses, lr = [], 0.0
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            lr = recipe.at(epoch, step)[0]
            set_lr(self.opt, lr)
            self.opt.zero_grad()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # The mean over this worker's batch, averaged over the equal-sized batches of all
            # workers by the optimizer: the loss normalised by the global batch (Goyal et al.
            # section 3, remark 3), so n workers x b equal one worker x n b.
            loss = self.criterion(self.model(x), y)
            loss.backward()
            self.opt.synchronize()
            mean_loss = float(pyddl.allreduce(loss.detach().reshape(1), op="average").item())
            if not math.isfinite(mean_loss):
                self._stop_nonfinite(epoch, step, steps, lr, loss, mean_loss, batches[step], x, y)
            with self.opt.skip_synchronize():
                self.opt.step()
            losses.append(mean_loss)
            self.position["global_step"] += 1
            self.bar.update(self.position["global_step"], gb, mean_loss, lr)
        seconds = time.perf_counter() - t0
        return sum(losses) / len(losses), lr, gb * steps, seconds

    def _stop_nonfinite(self, epoch, step, steps, lr, loss, mean_loss, indices, x, y) -> None:
        self.bar.close()
        global_step = self.position["global_step"] + 1
        folder = self.out / "nonfinite"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{global_step}-rank-{self.rank}.pt"
        dump = {"global_step": global_step, "epoch": epoch, "step": step, "lr": lr,
                "local_loss": float(loss.detach()), "indices": torch.tensor(indices),
                "inputs": x.cpu(), "targets": y.cpu()}
        if self.rank == 0:  # the same on every rank: the state before the step, not applied
            dump.update(model=self.model.state_dict(), optimizer=self.opt.state_dict())
        torch.save(dump, path)
        last = (f"the last good checkpoint is {self.last_checkpoint}; resume from it"
                if self.last_checkpoint else "no checkpoint was written yet; restart")
        raise NonFiniteLossError(
            f"the loss became {mean_loss} at optimizer step {global_step} (epoch {epoch}, batch "
            f"{step + 1} of {steps}, lr {lr:.4g}); training stopped before applying that step. "
            f"Each rank's batch, its loss, and (rank 0) the model and optimizer state are in "
            f"{folder}/step-{global_step}-rank-*.pt; {last} with a lower --base-lr or a longer "
            f"--warmup-epochs")

    def _average_buffers(self) -> None:
        # BN statistics are per worker during training (Goyal et al. section 2.3); averaging
        # them makes every rank evaluate and checkpoint the same model, so a resume is exact.
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if buffers and self.world > 1:
            pyddl.grouped_allreduce_(buffers, op="average")

    def _evaluate(self) -> tuple[float, float, float]:
        test = self.data.test
        batches = shard_batches(len(test), self.rank, self.world, _EVAL_BATCH * self.world,
                                epoch=0, shuffle=False, partial="even")
        # "even" gives a rank an empty last batch when fewer images than ranks remain: it has
        # nothing to run, and joins the one allreduce below all the same.
        loader = DataLoader(test, batch_sampler=[b for b in batches if b],
                            num_workers=self.cfg.loader_workers)
        counts = torch.zeros(4, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                logits = self.model(x)
                top1, top5 = topk_correct(logits, y, (1, 5))
                loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
                counts += torch.tensor([top1, top5, loss, len(y)], dtype=torch.float64)
        total = pyddl.allreduce(counts.to(self.device), op="sum").cpu().tolist()
        n = max(total[3], 1.0)
        # Top-5 of 5 classes or fewer is always 100%: not reported (None in the records).
        top5 = total[1] / n if self.data.num_classes > 5 else None
        return total[0] / n, top5, total[2] / n

    def _end_epoch(self, epoch, loss, lr, images, seconds) -> dict:
        self._average_buffers()
        top1, top5, test_loss = self._evaluate()
        self.totals["train_s"] += seconds
        self.totals["train_images"] += images
        wall = self._wall_s()
        record = {"epoch": epoch, "loss": loss, "top1": top1, "top5": top5, "test_loss": test_loss,
                  "images_per_s": images / seconds, "global_batch": self.recipe.global_batch_at(epoch),
                  "lr": lr, "wall_s": wall, "step": self.position["global_step"]}
        if self.rank == 0:
            self.bar.close()
            self.metrics.write(record)
            top5_text = "" if top5 is None else f", top-5 {100 * top5:.2f}%"
            print(f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {loss:.4f}, test top-1 "
                  f"{100 * top1:.2f}%{top5_text}, {images / seconds:,.1f} images/s, "
                  f"lr {lr:.4g}, elapsed {format_duration(wall)}", flush=True)
        # Parameters, optimizer state and the averaged buffers are equal on every rank, so
        # every rank reaches the same verdict here and none is left waiting.
        try:
            ckpt.ensure_finite({"model": self.model.state_dict(),
                                "optimizer": self.opt.state_dict()})
        except ckpt.NonFiniteError as exc:
            raise ckpt.NonFiniteError(f"after epoch {epoch + 1} (optimizer step "
                                      f"{self.position['global_step']}): {exc}") from None
        if self.rank == 0:
            extra = {"config": self.cfg.to_dict(), "totals": dict(self.totals, wall_s=wall),
                     "restarts": self.restarts}
            self.last_checkpoint = self.manager.save(ckpt.make_state(
                self.model, self.opt, epoch=epoch + 1, step=0,
                global_step=self.position["global_step"], sampler=self.sampler, extra=extra),
                index=epoch + 1)
        return record

    def _wall_s(self) -> float:
        # This session from start-up (data, model, first collectives) plus earlier sessions.
        return self.totals["wall_s"] + time.perf_counter() - self.started

    def _finish(self, last: dict) -> dict:
        cfg = self.cfg
        wall = self._wall_s()
        summary = {
            "test_top1": last["top1"], "test_top5": last["top5"], "test_loss": last["test_loss"],
            "images_per_s": self.totals["train_images"] / max(self.totals["train_s"], 1e-9),
            "epochs": cfg.epochs, "global_batch": self.recipe.global_batch_at(cfg.epochs - 1),
            "workers": self.world, "wall_s": wall, "model": self.model_name, "data": cfg.data,
            "train_images": len(self.data.train), "test_images": len(self.data.test),
            "steps": self.position["global_step"], "seed": cfg.seed, "out": str(self.out),
            "config": cfg.to_dict(), "restarts": self.restarts,
        }
        if self.rank == 0:
            write_summary(self.out / "summary.json", summary)
            plot_curves(read_metrics(self.out / "metrics.jsonl"), self.out / "curves.png")
            print(summary_text(summary))
            print(f"results: {self.out}/summary.json, metrics.jsonl, curves.png; checkpoints: "
                  f"{self.manager.directory}", flush=True)
        return summary


def train(cfg: TrainConfig, model: nn.Module | None = None) -> RunResult:
    """Train `cfg` on this rank; call it on every rank of the job (or let `pyddl train` do it).

    Joins the job with pyddl.init(topology=cfg.topology, allreduce=cfg.allreduce) unless
    pyddl is initialised already, and shuts it down again in that case only.

    Args:
        cfg: the run's settings; cfg.workers is replaced by the job's size.
        model: train this model instead of building cfg.model (it must not use the data's
            class count differently on different ranks); rank 0's initial values are used.

    Returns:
        RunResult with the summary (also in OUT/summary.json), the model and the output folder.

    Raises:
        ValueError, ImportError: bad input (data, model, batch, checkpoints), on every rank.
        NonFiniteLossError: the loss became NaN/Inf; the message names the step.
        pyddl.CollectiveError: a rank failed or stopped answering.

    Example:
        >>> result = train(TrainConfig(epochs=2, out="runs/try"))   # under pyddl run -np 2
        >>> result.summary["test_top1"]
    """
    owns = not pyddl.is_initialized()
    if owns:
        pyddl.init(topology=cfg.topology, allreduce=cfg.allreduce, backend=backend_for(cfg.device))
    try:
        return _Run(cfg, model).run()
    finally:
        sys.stdout.flush()
        if owns:
            pyddl.shutdown()
