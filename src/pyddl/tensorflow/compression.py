"""Horovod's `Compression` for TensorFlow: none, fp16 and bf16.

Each keeps Horovod's static `compress`/`decompress` on tf tensors and names the core's wire
codec in `codec`, which pyddl's allreduce uses directly: it divides by the number of ranks
before the cast, so an fp16 sum cannot overflow. A Compressor of your own (no `codec`) is
applied around the allreduce, as in Horovod.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["Compression", "Compressor", "NoneCompressor", "FP16Compressor", "BF16Compressor"]


class Compressor:
    """Interface of a wire compressor (Horovod's)."""

    codec: str | None = None

    @staticmethod
    def compress(tensor):
        raise NotImplementedError

    @staticmethod
    def decompress(tensor, ctx):
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
    wire_dtype: tf.DType

    @classmethod
    def compress(cls, tensor):
        if tensor.dtype.is_floating and tensor.dtype != cls.wire_dtype:
            return tf.cast(tensor, cls.wire_dtype), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor if ctx is None else tf.cast(tensor, ctx)


class FP16Compressor(_CastCompressor):
    codec = "fp16"
    wire_dtype = tf.float16


class BF16Compressor(_CastCompressor):
    codec = "bf16"
    wire_dtype = tf.bfloat16


class Compression:
    """Optional gradient compression for allreduce (`hvd.Compression.fp16`)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
