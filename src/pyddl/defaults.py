"""Sizes the library uses by default, in one pure module (no torch), so the simulator models
exactly what the library runs (pyddl.sim imports these rather than copying them)."""

__all__ = ["CHUNK_BYTES", "GRADIENT_BUCKET_BYTES", "FIRST_GRADIENT_BUCKET_BYTES", "FUSION_BUCKET_BYTES"]

# Multiring pipelining chunk (PYDDL_CHUNK_BYTES, --chunk-bytes).
CHUNK_BYTES = 2 * 1024 * 1024
# DistributedOptimizer's gradient buckets. Smaller than DDP's 25 MB: the bucket that becomes
# ready when backward ends is exposed whole. ResNet-18 on 2 emulated servers at 1 Gbit/s
# (pinned, fp16 wire): 25 MiB buckets left a last ~20 MiB bucket exposed (121 ms of a ~1060 ms
# step); 2 MiB buckets track backward closely.
GRADIENT_BUCKET_BYTES = 2 * 1024 * 1024
# DDP starts with a small first bucket so communication begins early in the first backward.
FIRST_GRADIENT_BUCKET_BYTES = 1024 * 1024
# grouped_allreduce_'s fusion buffer: PyTorch DDP's default (Li et al., VLDB 2020); Horovod
# fuses up to 128 MB.
FUSION_BUCKET_BYTES = 25 * 1024 * 1024
