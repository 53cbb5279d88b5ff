"""The data-parallel step model: when each gradient is ready, how buckets queue, what is exposed.

A `StepProfile` holds one worker's forward, backward and optimizer times and each gradient's
size and ready time, from a real torch module: FLOPs x a device rate, or measured on this
machine. `simulate_step` buckets gradients in ready order (pyddl's `plan_buckets`), runs one
bucket collective at a time in that order, and adds what is still running after backward,
the wait for the slowest worker and what the cluster's software stack costs (`[stack]`).
Caveat: communication is assumed not to slow the computation it overlaps. Importing this
module needs no torch; bucketing uses pyddl.comm.fusion, which still does (imported late).
"""

from __future__ import annotations

import difflib
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from pyddl.comm.layout import plan_buckets
from pyddl.defaults import GRADIENT_BUCKET_BYTES
from pyddl.sim.cost import DEFAULT_CHUNK_BYTES, Fabric, allreduce_s, auto_choice, straggler_wait_s

__all__ = [
    "Gradient",
    "StepProfile",
    "BucketRun",
    "StepPrediction",
    "simulate_step",
    "predict_scaling",
    "build_model",
    "count_flops",
    "flop_profile",
    "device_flops_per_s",
    "measure_profile",
    "load_profile",
    "SGD_BYTES_PER_PARAM",
    "SMALL_ALLREDUCE_BYTES",
    "stack_sizes",
]

# SGD with momentum reads weight, gradient and momentum and writes weight and momentum:
# five fp32 passes over the parameters, bound by memory bandwidth.
SGD_BYTES_PER_PARAM = 20
# A per-step loss/metric allreduce: a few fp32 scalars.
SMALL_ALLREDUCE_BYTES = 16


@dataclass(frozen=True)
class Gradient:
    """One parameter's gradient: its size and when backward produces it (s after it starts)."""

    name: str
    numel: int
    itemsize: int
    ready_s: float
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class StepProfile:
    """One worker's training step at a per-worker batch, gradients in ready order."""

    model: str
    batch: int
    forward_s: float
    backward_s: float
    optimizer_s: float
    gradients: tuple[Gradient, ...]
    source: str  # "flops: <device>" or "measured: <where>"
    image_size: int | None = None
    # Measured spread of the whole step over the repeats (std / mean), for the user to pass as
    # --step-cv; the prediction takes the spread from there or from the cluster's [stack].
    step_cv: float = 0.0

    @property
    def gradient_bytes(self) -> int:
        return sum(g.nbytes for g in self.gradients)

    def to_dict(self) -> dict:
        return {**asdict(self), "gradients": [asdict(g) for g in self.gradients]}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def scaled(self, factor: float, why: str) -> "StepProfile":
        """The same step with every compute time (and gradient ready time) times `factor`."""
        return replace(self, forward_s=self.forward_s * factor, backward_s=self.backward_s * factor,
                       optimizer_s=self.optimizer_s * factor, source=f"{self.source}, x{factor:.3f} ({why})",
                       gradients=tuple(replace(g, ready_s=g.ready_s * factor) for g in self.gradients))


def load_profile(path: str) -> StepProfile:
    """Read a step profile JSON written by `StepProfile.save` (`pyddl simulate --profile-step`).

    Raises:
        ValueError: the file is missing, not JSON, or lacks the profile's fields.
    """
    try:
        with open(path) as f:
            data = json.load(f)
        grads = tuple(sorted((Gradient(**g) for g in data.pop("gradients")), key=lambda g: g.ready_s))
        profile = StepProfile(gradients=grads, **data)
    except FileNotFoundError:
        raise ValueError(f"step profile {path!r} does not exist; write one with "
                         "`pyddl simulate --profile-step PATH --model M --batch B`") from None
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"step profile {path!r} is not a pyddl step profile ({err}); write one "
                         "with `pyddl simulate --profile-step PATH`") from None
    if min(profile.forward_s, profile.backward_s, profile.optimizer_s) < 0 or profile.batch < 1:
        raise ValueError(f"step profile {path!r} has negative times or a batch below 1")
    return profile


@dataclass(frozen=True)
class BucketRun:
    """One bucket's collective: its size, when it was ready, when it ran."""

    nbytes: int
    ready_s: float
    start_s: float
    end_s: float


@dataclass(frozen=True)
class StepPrediction:
    """A predicted step: compute, the collectives it waits for, and the exposed part.

    `comm_cpu_s` is the CPU time communication takes from backward where they share the
    cores (0 unless the cluster states it); `backward_s` is the profile's, without it.
    `straggler_s` is the expected wait for the slowest worker, `fixed_s` the per-step costs
    that do not shrink (the stack's fixed host work and its small per-step allreduces).
    """

    forward_s: float
    backward_s: float
    optimizer_s: float
    exposed_s: float
    buckets: tuple[BucketRun, ...]
    comm_cpu_s: float = 0.0
    straggler_s: float = 0.0
    fixed_s: float = 0.0

    @property
    def step_s(self) -> float:
        return (self.forward_s + self.backward_s + self.comm_cpu_s + self.exposed_s + self.optimizer_s
                + self.straggler_s + self.fixed_s)

    @property
    def comm_s(self) -> float:
        return sum(b.end_s - b.start_s for b in self.buckets)


def simulate_step(
    profile: StepProfile,
    collective_s: Callable[[int], float],
    bucket_bytes: int = GRADIENT_BUCKET_BYTES,
    cpu_s: Callable[[int], float] | None = None,
    overlap: bool = True,
) -> StepPrediction:
    """Predict one step: buckets in ready order, one collective at a time, exposure at the end.

    A bucket is handed to the engine when its last gradient is ready and starts once the
    engine is free (pyddl runs bucket collectives in one global order, DESIGN.md "Overlap").
    Times are relative to the start of backward. With `cpu_s`, communication's CPU time
    comes out of compute: backward lasts longer by the buckets' total CPU time, spread
    evenly over it (each gradient is ready that much later in proportion).

    Args:
        profile: the worker's step.
        collective_s: seconds to allreduce a bucket of that many bytes.
        bucket_bytes: the bucket cap (a larger gradient gets a bucket of its own); 0 for one
            bucket per layer (consecutive gradients of one module, as Caffe's layer-wise reduce).
        cpu_s: CPU seconds a bucket of that many bytes takes from compute (None: none).
        overlap: False where the framework reduces only after backward: every bucket is
            handed over when backward ends.

    Returns:
        The prediction; `step_s` = forward + backward + its communication CPU + exposed +
        optimizer.

    Example:
        >>> g = (Gradient("w", 1, 4, 1.0),)
        >>> p = StepProfile("toy", 1, 0.5, 1.0, 0.0, g, "hand")
        >>> simulate_step(p, lambda n: 2.0).exposed_s
        2.0
    """
    buckets = _group(profile.gradients, bucket_bytes)
    sizes = [sum(profile.gradients[i].nbytes for i in members) for members in buckets]
    cpu = sum(cpu_s(n) for n in sizes) if cpu_s is not None else 0.0
    stretch = (profile.backward_s + cpu) / profile.backward_s if profile.backward_s > 0 else 1.0
    runs, engine_free = [], 0.0
    for members, nbytes in zip(buckets, sizes):
        ready = max(profile.gradients[i].ready_s for i in members) * stretch if overlap else profile.backward_s + cpu
        start = max(ready, engine_free)
        engine_free = start + collective_s(nbytes)
        runs.append(BucketRun(nbytes, ready, start, engine_free))
    exposed = max(0.0, engine_free - (profile.backward_s + cpu))
    return StepPrediction(profile.forward_s, profile.backward_s, profile.optimizer_s, exposed, tuple(runs), cpu)


def _group(gradients: Sequence[Gradient], bucket_bytes: int) -> list[list[int]]:
    """Bucket members (indices in ready order): pyddl's plan_buckets, or one bucket per layer."""
    if not gradients:
        return []
    if bucket_bytes == 0:
        groups: list[list[int]] = []
        for i, g in enumerate(gradients):
            layer = g.name.rsplit(".", 1)[0]
            if groups and gradients[groups[-1][-1]].name.rsplit(".", 1)[0] == layer:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
    return plan_buckets([(g.numel, g.dtype, g.itemsize) for g in gradients], bucket_bytes)


def stack_sizes(cluster, bucket_bytes: int | None = None, chunk_bytes: int | None = None) -> tuple[int, int]:
    """The bucket cap and chunk a prediction uses: given, else the cluster's stack's, else pyddl's."""
    stack = cluster.stack
    if bucket_bytes is None:
        bucket_bytes = GRADIENT_BUCKET_BYTES if stack.bucket_mb is None else int(stack.bucket_mb * 2**20)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES if stack.chunk_mb is None else max(1, int(stack.chunk_mb * 2**20))
    return bucket_bytes, chunk_bytes


def _predict_one(profile: StepProfile, cluster, gpus: int, algorithm: str, bucket_bytes: int, chunk_bytes: int,
                 ring_max: int | None, step_cv: float) -> tuple[StepPrediction, Fabric]:
    """One step of `gpus` workers: the step model plus the stack's costs and the slowest worker."""
    stack = cluster.stack
    fixed = stack.step_fixed_us * 1e-6
    if gpus == 1:
        pred = simulate_step(profile, lambda n: 0.0, bucket_bytes)
        return replace(pred, fixed_s=fixed), cluster.fabric(1, ring_max)
    fabric = cluster.fabric(gpus, ring_max)
    pipeline = cluster.multiring_pipeline
    call = stack.call_us * 1e-6
    staging = stack.staging_gb_per_s * 1e9 if stack.staging_gb_per_s and gpus > cluster.gpus_per_server else None

    known: dict[int, float] = {}  # a model's buckets repeat their sizes: each is costed once

    def collective_s(nbytes: int) -> float:
        if nbytes not in known:
            # Host staging: the whole bucket to host memory before the collective and back after.
            copies = 2 * nbytes / staging if staging else 0.0
            known[nbytes] = call + copies + allreduce_s(fabric, algorithm, nbytes, chunk_bytes, pipeline)
        return known[nbytes]

    pred = simulate_step(profile, collective_s, bucket_bytes, _comm_cpu(cluster, fabric, algorithm, chunk_bytes),
                         stack.overlap)
    compute = profile.forward_s + profile.backward_s + profile.optimizer_s
    fixed += stack.step_allreduces * collective_s(SMALL_ALLREDUCE_BYTES)
    return replace(pred, straggler_s=straggler_wait_s(gpus, step_cv * compute), fixed_s=fixed), fabric


def predict_scaling(
    profile: StepProfile,
    cluster,
    gpus: Sequence[int],
    algorithms: Sequence[str],
    bucket_bytes: int | None = None,
    chunk_bytes: int | None = None,
    ring_max: int | None = None,
    baseline_gpus: int = 1,
    step_cv: float | None = None,
) -> list[dict]:
    """Predict step time, images/s and scaling efficiency per GPU count and algorithm.

    Efficiency = throughput(n) / (n / b x throughput(b)) = step(b) / step(n) at the same
    per-GPU batch, b = `baseline_gpus` (1: one GPU, communicating nothing; Goyal et al.
    measured from one 8-GPU server). Each step adds the cluster's `[stack]` costs: a call
    cost and host staging per bucket collective, the per-step fixed costs, and the expected
    wait for the slowest of n workers (step_cv x compute step x E[max of n normals]).

    Args:
        cluster: a `pyddl.sim.cluster.Cluster`.
        bucket_bytes, chunk_bytes: None for the cluster's stack's, else pyddl's defaults.
        ring_max: split rings between servers longer than this (`Cluster.fabric`).
        baseline_gpus: the GPU count efficiency is measured against.
        step_cv: per-worker step-time spread (std / mean); None for the cluster's stack's.

    Returns:
        One dict per (gpus, algorithm): gpus, algorithm, topology, step_s, images_per_s,
        scaling_efficiency, exposed_s, comm_s, comm_cpu_s, straggler_s, fixed_s, buckets,
        baseline_gpus.

    Raises:
        ValueError: a GPU count the cluster cannot lay out, or an algorithm the cost model
            cannot price (e.g. "hd" on a count that is not a power of two).
    """
    bucket_bytes, chunk_bytes = stack_sizes(cluster, bucket_bytes, chunk_bytes)
    cv = cluster.stack.step_cv if step_cv is None else step_cv
    if not (0 <= cv <= 1):
        raise ValueError(f"step-time spread must be a fraction from 0 to 1, got {cv!r}")
    rows = []
    for n in gpus:
        for alg in algorithms:
            pred, fabric = _predict_one(profile, cluster, n, alg, bucket_bytes, chunk_bytes, ring_max, cv)
            base = _predict_one(profile, cluster, baseline_gpus, alg, bucket_bytes, chunk_bytes, ring_max, cv)[0]
            rows.append({
                "gpus": n,
                "algorithm": alg,
                "topology": "x".join(map(str, fabric.dims)),
                "step_s": pred.step_s,
                "images_per_s": n * profile.batch / pred.step_s,
                "scaling_efficiency": base.step_s / pred.step_s,
                "exposed_s": pred.exposed_s,
                "comm_s": pred.comm_s,
                "comm_cpu_s": pred.comm_cpu_s,
                "straggler_s": pred.straggler_s,
                "fixed_s": pred.fixed_s,
                "buckets": len(pred.buckets),
                "baseline_gpus": baseline_gpus,
            })
    return rows


def _comm_cpu(cluster, fabric, algorithm: str, chunk_bytes: int) -> Callable[[int], float] | None:
    """The CPU seconds a bucket's allreduce takes from compute, where the cluster states it."""
    costs = cluster.comm_cpu
    if algorithm == "auto" and "native" in costs and "multiring" in costs:
        return lambda nbytes: costs[auto_choice(fabric, nbytes, chunk_bytes, cluster.multiring_pipeline)].seconds(nbytes)
    return costs[algorithm].seconds if algorithm in costs else None


# ---- per-layer information from a real torch module -----------------------------------------


def build_model(name: str, device: str = "cpu", num_classes: int = 1000):
    """Construct torchvision model `name` with random weights (weights=None, no download).

    Raises:
        ValueError: `name` is not a torchvision classification model (close names listed).
        RuntimeError: torchvision is not installed.
    """
    try:
        import torch
        import torchvision
    except ModuleNotFoundError:
        raise RuntimeError("per-layer model info needs torchvision: pip install torchvision") from None
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model {name!r}: {hint}pass a torchvision classification model "
                         "name such as resnet18, resnet50, resnet101, vgg16, vit_b_16")
    with torch.device(device):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def count_flops(model, input_shape: Sequence[int]) -> list[dict]:
    """Count each module's forward and backward FLOPs for one input batch of `input_shape`.

    Runs on the meta device when the model lives there (no real arithmetic). Returns, in
    forward order, one dict per module owning parameters: name, fwd_flops, bwd_flops,
    params [(name, numel, itemsize, dtype)], called; modules never called, or parameters
    owned by a container, come last with zero FLOPs and `called` False (their gradients
    are ready at the end). A called module may count zero FLOPs too: the counter has no
    formula for BatchNorm, which is memory-bound.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    order: dict[str, None] = {}  # modules owning parameters, in first-call order

    def seen(name: str):
        def hook(_module, _inputs) -> None:
            order.setdefault(name)
        return hook

    handles = [mod.register_forward_pre_hook(seen(name)) for name, mod in model.named_modules()
               if any(True for _ in mod.parameters(recurse=False))]
    device = next(model.parameters()).device
    x = torch.randn(*input_shape, device=device) if device.type != "meta" else torch.empty(*input_shape, device=device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # BatchNorm refuses one-image batches in training mode; FLOPs are the same
    try:
        with counter:
            out = model(x)
            fwd = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
            out.float().sum().backward()
            total = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    root = type(model).__name__
    modules = dict(model.named_modules())
    rows = []
    for mod_name in list(order) + [n for n in modules if n not in order]:
        own = [(f"{mod_name}.{p}" if mod_name else p, t.numel(), t.element_size(), str(t.dtype).removeprefix("torch."))
               for p, t in modules[mod_name].named_parameters(recurse=False) if t.requires_grad]
        if not own:
            continue
        key = f"{root}.{mod_name}" if mod_name else root
        called = mod_name in order
        f = fwd.get(key, 0) if called else 0
        b = total.get(key, 0) - f if called else 0
        rows.append({"name": mod_name, "fwd_flops": f, "bwd_flops": b, "params": own, "called": called})
    return rows


def device_flops_per_s(device, reference_rows: list[dict] | None = None) -> float:
    """Return the device's effective training FLOP/s from its published reference throughput.

    rate = train FLOPs per image of the reference model x images/s, after taking the SGD
    update (memory-bound) out of the reference step, so that a simulated step of the
    reference model at the reference batch reproduces the published throughput.
    `reference_rows`: the reference model's `count_flops` rows where the caller has them.
    """
    size = device.reference_image_size
    rows = reference_rows
    if rows is None:
        rows = count_flops(build_model(device.reference_model, device="meta"), (1, 3, size, size))
    per_image = sum(r["fwd_flops"] + r["bwd_flops"] for r in rows)
    params = sum(p[1] for r in rows for p in r["params"])
    step = device.reference_batch / device.reference_images_per_s
    opt = params * SGD_BYTES_PER_PARAM / (device.memory_gb_per_s * 1e9)
    return per_image * device.reference_batch / (step - opt)


def flop_profile(model_name: str, batch: int, device, image_size: int = 224, num_classes: int = 1000) -> StepProfile:
    """Build a step profile from the model's FLOPs and the device's effective rate.

    Each module's backward takes bwd FLOPs / rate, in reverse forward order; its gradients
    are ready when it ends. Memory-bound layers (BN, ReLU) carry no FLOPs here: their time is
    spread over the others through the rate, which comes from a whole measured step.
    """
    model = build_model(model_name, device="meta", num_classes=num_classes)
    rows = count_flops(model, (1, 3, image_size, image_size))
    # Counting a model's FLOPs takes a second or two; the reference model is often this one.
    is_reference = (model_name, image_size, num_classes) == (device.reference_model, device.reference_image_size, 1000)
    rate = device_flops_per_s(device, rows if is_reference else None)
    forward_s = batch * sum(r["fwd_flops"] for r in rows) / rate
    backward_s = batch * sum(r["bwd_flops"] for r in rows) / rate
    grads, t = [], 0.0
    for r in reversed(rows):
        t += batch * r["bwd_flops"] / rate
        # A module forward never reached (or a container's own parameter) is done at the end.
        ready = t if r["called"] else backward_s
        # Within a module PyTorch finishes the bias before the weight (reverse registration).
        grads += [Gradient(n, numel, size, ready, dtype) for n, numel, size, dtype in reversed(r["params"])]
    grads.sort(key=lambda g: g.ready_s)
    params = sum(g.numel for g in grads)
    optimizer_s = params * SGD_BYTES_PER_PARAM / (device.memory_gb_per_s * 1e9)
    return StepProfile(model_name, batch, forward_s, backward_s, optimizer_s, tuple(grads),
                       f"flops: {device.name}, {rate / 1e12:.2f} effective TFLOP/s", image_size)


def measure_profile(model, batch: int, input_shape: Sequence[int], repeats: int = 3,
                    name: str | None = None, num_classes: int = 1000) -> StepProfile:
    """Time forward, backward (each gradient's ready time) and an SGD step on this machine.

    Gradient ready times come from `register_post_accumulate_grad_hook`, the hook pyddl's
    buckets use, so they are what the engine would see; medians over `repeats` timed steps
    after one warm-up step. Runs on the model's device with torch's current thread count; on
    CUDA every timestamp waits for the queued kernels (hooks fire when work is launched, not
    done), which serialises the step a little but dates each gradient right.

    Args:
        model: a torch module taking a batch of `input_shape` (without the batch axis) and
            returning logits of `num_classes`.
    """
    import torch

    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be >= 1, got batch={batch}, repeats={repeats}")
    device = next(model.parameters()).device
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stamps: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)

    def now() -> float:
        sync(device)
        return time.perf_counter()

    def stamp(name: str):
        def hook(_param) -> None:
            if name not in stamps:
                stamps[name] = now()
        return hook

    handles = [p.register_post_accumulate_grad_hook(stamp(n)) for n, p in params]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *input_shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    fwd, bwd, upd, ready = [], [], [], {n: [] for n, _ in params}
    try:
        for i in range(repeats + 1):
            stamps.clear()
            t0 = now()
            loss = loss_fn(model(x), y)
            t1 = now()
            loss.backward()
            t2 = now()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = now()
            if i == 0:
                continue  # warm-up: allocator, kernels, momentum buffers
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            for n, _ in params:
                ready[n].append(stamps.get(n, t2) - t1)
    finally:
        for h in handles:
            h.remove()
    grads = sorted(
        (Gradient(n, p.numel(), p.element_size(), statistics.median(ready[n]), str(p.dtype).removeprefix("torch."))
         for n, p in params),
        key=lambda g: g.ready_s,
    )
    where = f"measured: {device.type}, {torch.get_num_threads()} threads, median of {repeats}"
    size = input_shape[-1] if len(input_shape) == 3 else None
    steps = [f + b + u for f, b, u in zip(fwd, bwd, upd)]
    cv = statistics.stdev(steps) / statistics.mean(steps) if len(steps) > 1 else 0.0
    return StepProfile(name or type(model).__name__, batch, statistics.median(fwd), statistics.median(bwd),
                       statistics.median(upd), tuple(grads), where, size, cv)
