"""Sizes the library uses by default, in one pure module (no torch), so the simulator models
exactly what the library runs (pyddl.sim imports these rather than copying them)."""

__all__ = ["CHUNK_BYTES", "GRADIENT_BUCKET_BYTES", "FIRST_GRADIENT_BUCKET_BYTES", "FUSION_BUCKET_BYTES",
           "WORKER_MALLOC_ENV"]

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
# glibc malloc settings `pyddl run` gives its workers unless the user set them: keep freed
# memory for the next allocation instead of returning it to the system. glibc serves blocks
# over 32 MiB by mmap and unmaps them when freed, so every new large tensor (a fresh gradient,
# an out-of-place result) faults in and zeroes its pages again: 35 ms for a 64 MiB torch.ones
# on this machine, 3.5 ms with these. A worker's memory then stays at its peak, as a training
# step reaches it again every step anyway. Ignored by other allocators (jemalloc, tcmalloc).
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**31 - 1), "MALLOC_TRIM_THRESHOLD_": str(2**32 - 1)}
