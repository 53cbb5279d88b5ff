"""Horovod's `Compression` namespace: none, fp16 and bf16 wire compression.

Each compressor keeps Horovod's static `compress`/`decompress` interface (for scripts that call
them) and also names the core wire codec in `codec`, which pyddl's collectives use directly:
the core pre-divides sums by the number of ranks so fp16 cannot overflow.
"""

from __future__ import annotations

import torch

__all__ = ["Compression", "Compressor", "NoneCompressor", "FP16Compressor", "BF16Compressor"]


class Compressor:
    """Interface of a wire compressor (Horovod's)."""

    codec: str | None = None

    @staticmethod
    def compress(tensor: torch.Tensor):
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        raise NotImplementedError


class NoneCompressor(Compressor):
    codec = "none"

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class _CastCompressor(Compressor):
    wire_dtype: torch.dtype

    @classmethod
    def compress(cls, tensor):
        if tensor.is_floating_point() and tensor.dtype != cls.wire_dtype:
            return tensor.to(cls.wire_dtype), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor if ctx is None else tensor.to(ctx)


class FP16Compressor(_CastCompressor):
    codec = "fp16"
    wire_dtype = torch.float16


class BF16Compressor(_CastCompressor):
    codec = "bf16"
    wire_dtype = torch.bfloat16


class Compression:
    """Optional gradient compression for allreduce (`hvd.Compression.fp16`)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
