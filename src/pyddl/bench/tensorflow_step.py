"""Training-step benchmark for Keras 3 on TensorFlow: pyddl.keras against one worker alone and
against TensorFlow's own MultiWorkerMirroredStrategy, on the same workers, in one run.

`pyddl bench step --framework tensorflow -np 2` times the model alone on one worker, then
starts N workers that time, in turn: the Keras model and optimizer with no communication
(`keras-noop`, the baseline), pyddl.keras's DistributedOptimizer (`keras-pyddl`, and
`keras-pyddl-fp16` with fp16 on the wire), and the same step under
`tf.distribute.MultiWorkerMirroredStrategy` (`keras-mwms`: TF's ring all-reduce over its own
gRPC channels; Keras's optimizer sums the replicas' gradients). Every system runs the same
tf.function step (GradientTape, SGD with momentum) on the same seeded model and synthetic
batch; they take turns step by step, as in the torch bench (pyddl.bench.step), and the same
figures come out: step time (barrier to the slowest rank's end), images/s, communication
efficiency against keras-noop, and scaling efficiency against one worker alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import time

import torch

from pyddl.bench.step import _ratio, cpu_ceiling, job_ranks_per_core
from pyddl.bench.systems import TENSORFLOW_MODELS, TENSORFLOW_SYSTEMS, tensorflow_default_systems

__all__ = ["SYSTEMS", "MODELS", "default_systems", "run_systems", "summarize", "worker_main"]

SYSTEMS = TENSORFLOW_SYSTEMS
default_systems = tensorflow_default_systems
MODELS = TENSORFLOW_MODELS
_NUM_CLASSES = 1000


def _my_address() -> str:
    """The address this rank reaches the job's rendezvous from (its own under emulation)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 1))
        return s.getsockname()[0]


def _start_mwms(tf):
    """MultiWorkerMirroredStrategy over every rank of the pyddl job; it must exist before TF
    runs its first op, so the workers' addresses travel through pyddl's core (torch) first."""
    from pyddl.torch.functions import allgather_object

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    workers = allgather_object(f"{_my_address()}:{port}")
    import pyddl

    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": pyddl.rank()}})
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def _model(keras, name: str, image_size: int):
    keras.utils.set_random_seed(0)
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=(image_size, image_size, 3), classes=_NUM_CLASSES)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        layers.Conv2D(32, 3, strides=2, activation="relu"), layers.BatchNormalization(),
        layers.Conv2D(64, 3, strides=2, activation="relu"), layers.BatchNormalization(),
        layers.Conv2D(128, 3, strides=2, activation="relu"), layers.BatchNormalization(),
        layers.GlobalAveragePooling2D(), layers.Dense(_NUM_CLASSES),
    ])


class _Runner:
    """One system, built once: a tf.function training step on one fixed synthetic batch."""

    def __init__(self, system: str, tf, keras, model_name: str, batch: int, image_size: int, strategy, n: int):
        import pyddl.keras as hvd

        self.mwms = system == "keras-mwms"
        with strategy.scope() if self.mwms else contextlib.nullcontext():
            model = _model(keras, model_name, image_size)
            opt = keras.optimizers.SGD(0.01, momentum=0.9)
            if system.startswith("keras-pyddl"):
                opt = hvd.DistributedOptimizer(opt, compression=hvd.Compression.fp16 if system.endswith("fp16")
                                               else hvd.Compression.none)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        # MWMS sums the replicas' gradients: each replica's loss is its share of the mean.
        share = 1.0 / n if self.mwms else 1.0

        def step_fn(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True)) * share
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        self.fn = tf.function((lambda x, y: strategy.run(step_fn, args=(x, y))) if self.mwms else step_fn)
        self.strategy = strategy
        self.x = tf.random.stateless_normal([batch, image_size, image_size, 3], seed=[1, 1])
        self.y = tf.random.stateless_uniform([batch], seed=[1, 2], maxval=_NUM_CLASSES, dtype=tf.int32)

    def step(self) -> tuple[float, float]:
        """One training step, finished; its wall time and this process's CPU time."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn(self.x, self.y)
        float(self.strategy.experimental_local_results(out)[0] if self.mwms else out)
        return time.perf_counter() - t0, time.process_time() - c0


def run_systems(systems: list[str], model_name: str, batch: int, image_size: int, steps: int, warmup: int,
                rounds: int) -> tuple[int, list[dict]]:
    """Inside a job: time each system on every rank, interleaved step by step; return (rank,
    rows) with the median over steps of the slowest rank's time, and each round's median."""
    import pyddl

    pyddl.init()
    rank, n = pyddl.rank(), pyddl.size()
    per_core = job_ranks_per_core()
    import tensorflow as tf

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    strategy = _start_mwms(tf) if "keras-mwms" in systems else None
    import keras

    runners = {s: _Runner(s, tf, keras, model_name, batch, image_size, strategy, n) for s in systems}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    times = {s: [] for s in systems}
    cpu = {s: [] for s in systems}
    per_round = {s: [] for s in systems}
    passes = 0
    for r in range(rounds):
        this_round = torch.zeros(len(systems), steps, dtype=torch.float64)
        for step in range(steps):
            first = passes % len(systems)
            for k in range(len(systems)):
                i = (first + k) % len(systems)
                pyddl.barrier()
                wall, used = runners[systems[i]].step()
                this_round[i, step] = wall
                cpu[systems[i]].append(used)
            passes += 1
        worst = pyddl.allreduce(this_round, op="max")  # the slowest rank sets each step's pace
        for system, walls in zip(systems, worst.tolist()):
            times[system].extend(walls)
            per_round[system].append(statistics.median(walls))
            if rank == 0:
                print(f"  round {r + 1}/{rounds}  {system:<18} {per_round[system][-1] * 1e3:8.1f} ms/step", flush=True)
    worst_cpu = pyddl.allreduce(torch.tensor([statistics.median(cpu[s]) for s in systems], dtype=torch.float64),
                                op="max").tolist()
    rows = []
    for system, cpu_s in zip(systems, worst_cpu):
        step_s = statistics.median(times[system])
        rows.append({"system": system, "framework": "tensorflow", "workers": n, "batch_per_worker": batch,
                     "median_step_s": step_s, "images_per_s": n * batch / step_s, "cpu_s_per_step": cpu_s,
                     "ranks_per_core": per_core, "round_medians_s": per_round[system], "step_times_s": times[system]})
    pyddl.shutdown()
    return rank, rows


def summarize(rows: list[dict]) -> list[dict]:
    """Add the communication efficiency (against keras-noop on as many workers), its CPU
    ceiling, and the scaling efficiency (against one worker alone) to the rows."""
    by = {(r["system"], r["workers"]): r for r in rows}
    single = next((r for r in rows if r["system"] == "single"), None)
    out = []
    for r in rows:
        r = dict(r)
        noop = by.get(("keras-noop", r["workers"]))
        if r["system"] != "single" and noop is not None:
            r["comm_efficiency"], _ = _ratio(noop, r)
            r["exposed_comm_fraction"] = 1 - r["comm_efficiency"]
            r["comm_cpu_s"] = r["cpu_s_per_step"] - noop["cpu_s_per_step"]
            r["cpu_bound_comm_efficiency"] = cpu_ceiling(noop["median_step_s"], r["comm_cpu_s"],
                                                         r.get("ranks_per_core", 1.0))
        if single is not None:
            r["scaling_efficiency"] = r["images_per_s"] / (r["workers"] * single["images_per_s"])
        out.append(r)
    return out


def worker_main(out_path: str, systems: list[str], model_name: str, batch: int, image_size: int, steps: int,
                warmup: int, rounds: int) -> None:
    """The body run by each worker of a TF step-bench job; rank 0 writes the rows to out_path."""
    rank, rows = run_systems(systems, model_name, batch, image_size, steps, warmup, rounds)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)
