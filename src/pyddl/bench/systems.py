"""The systems each `pyddl bench step` compares, by name, with what each runs.

Kept apart from the benches themselves, which import torch or TensorFlow: the command line
lists these in its help, and `pyddl --help` should not wait for a framework to load.
"""

from __future__ import annotations

__all__ = ["TORCH_SYSTEMS", "TENSORFLOW_SYSTEMS", "TENSORFLOW_MODELS", "NOCHECK", "ON_PYDDL",
           "torch_default_systems", "tensorflow_default_systems"]

# name -> (family, what it runs); the family's "-noop" member is its no-communication time.
TORCH_SYSTEMS = {
    "single": "one worker alone, plain optimizer",
    "ddp": "torch DDP, the backend's allreduce",
    "ddp-fp16": "torch DDP with torch's fp16_compress_hook",
    "ddp-bf16": "torch DDP with torch's bf16_compress_hook",
    "ddp-noop": "torch DDP with a no-op hook (no communication)",
    "pyddl-native": "pyddl DistributedOptimizer, native allreduce",
    "pyddl-native-fp16": "pyddl, native allreduce, fp16 on the wire",
    "pyddl-native-bf16": "pyddl, native allreduce, bf16 on the wire",
    "pyddl-multiring": "pyddl DistributedOptimizer, multiring allreduce",
    "pyddl-multiring-fp16": "pyddl, multiring allreduce, fp16 on the wire",
    "pyddl-auto": "pyddl DistributedOptimizer, auto (timed at start-up, per message size)",
    "pyddl-auto-fp16": "pyddl, auto allreduce, fp16 on the wire",
    "pyddl-noop": "pyddl's compute alone: the plain optimizer, no communication",
    "pyddl-native-fp16-nocheck": "pyddl native fp16 with the cross-rank check off (pyddl.set_check(False))",
    "pyddl-native-bf16-nocheck": "pyddl native bf16 with the cross-rank check off",
    "pyddl-multiring-nocheck": "pyddl multiring with the cross-rank check off",
    "ddp-on-pyddl": "torch DDP on a group of backend pyddl (init_process_group(\"pyddl\")), multiring",
    "fsdp2": "torch FSDP2 (fully_shard per top-level layer) on Gloo",
    "fsdp2-on-pyddl": "torch FSDP2 on a group of backend pyddl, multiring",
}
NOCHECK = "-nocheck"
ON_PYDDL = "-on-pyddl"  # torch's own wrappers on backend pyddl (docs/backend.md): named, not default


def torch_default_systems() -> list[str]:
    """What `pyddl bench step` runs without --systems (the bf16 and unchecked variants only
    when named)."""
    return [s for s in TORCH_SYSTEMS
            if s != "single" and not s.endswith(("bf16", NOCHECK, ON_PYDDL)) and not s.startswith("fsdp2")]


# pyddl.bench.tensorflow_step: Keras 3 on TensorFlow.
TENSORFLOW_SYSTEMS = {
    "single": "one worker alone, plain Keras optimizer",
    "keras-noop": "Keras model and optimizer on every worker, no communication",
    "keras-pyddl": "pyddl.keras DistributedOptimizer, the job's allreduce",
    "keras-pyddl-fp16": "pyddl.keras DistributedOptimizer, fp16 on the wire",
    "keras-mwms": "tf.distribute.MultiWorkerMirroredStrategy (TF's ring all-reduce over gRPC)",
}

# The Keras models pyddl.bench.tensorflow_step builds.
TENSORFLOW_MODELS = ("small_cnn", "resnet50")


def tensorflow_default_systems() -> list[str]:
    """What `pyddl bench step --framework tensorflow` runs without --systems."""
    return [s for s in TENSORFLOW_SYSTEMS if s != "single"]
