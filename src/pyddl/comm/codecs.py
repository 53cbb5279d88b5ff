"""Wire codecs: cast a floating-point buffer for the wire, then back into its own dtype.

fp16 has a narrow range, so a sum is pre-divided by the number of ranks before the cast and
multiplied back after, as PyTorch's fp16_compress_hook divides by the world size. Integer
tensors are never compressed.
"""

from __future__ import annotations

import torch

from pyddl.comm import registry

__all__ = ["Codec", "get_codec", "CODECS", "ENCODE_BLOCK"]

# Elements divided and cast per block on the CPU. torch.div into a narrower `out` computes into
# a temporary of the input's dtype as large as the input, then casts it. For a whole 47 MB
# buffer (ResNet-18's gradients) that was a fresh 47 MB per call, too large for malloc to keep:
# the kernel zeroed its pages every time, 190-270 ms of CPU in a 1 s fp16 allreduce on the
# 2 x 2 emulated bed. A 1 MiB temporary is served again from malloc's free memory.
ENCODE_BLOCK = 1 << 18


class Codec:
    """Cast to `wire_dtype` for the collective; `None` sends the tensor as it is."""

    def __init__(self, name: str, wire_dtype: torch.dtype | None):
        self.name = name
        self.wire_dtype = wire_dtype

    def __repr__(self) -> str:
        return f"Codec({self.name})"

    def applies_to(self, tensor: torch.Tensor) -> bool:
        return (
            self.wire_dtype is not None
            and tensor.is_floating_point()
            and tensor.dtype != self.wire_dtype
        )

    def encode_(self, tensor: torch.Tensor, wire: torch.Tensor, op: str, world_size: int) -> None:
        """Write `tensor` into `wire` (same shape, contiguous, the wire dtype); for sum/average
        divided by world_size.

        The division happens in the tensor's own dtype, in the same pass as the cast, so a
        value that fits fp16 only after the division (above 65504) does not become inf. On the
        CPU it goes block by block (ENCODE_BLOCK).
        """
        if op not in ("sum", "average"):
            wire.copy_(tensor)
            return
        src, dst = tensor.reshape(-1), wire.view(-1)
        block = ENCODE_BLOCK if tensor.device.type == "cpu" else max(1, src.numel())
        for lo in range(0, src.numel(), block):
            torch.div(src[lo : lo + block], world_size, out=dst[lo : lo + block])

    def decode_(self, wire: torch.Tensor, out: torch.Tensor, op: str, world_size: int) -> None:
        """Write the reduced wire tensor back into `out` in its own dtype.

        The wire was reduced with a sum of pre-divided values, which is already the average.
        """
        out.copy_(wire)
        if op == "sum":
            out.mul_(world_size)


_WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = {name: Codec(name, _WIRE_DTYPES[name]) for name in registry.CODECS}


def get_codec(name: "str | Codec | None") -> Codec:
    """Look up a codec by name ("none", "fp16", "bf16"); None means "none"."""
    if name is None:
        return CODECS["none"]
    if isinstance(name, Codec):
        return name
    try:
        return CODECS[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"unknown compression {name!r}; choose one of {', '.join(CODECS)}"
        ) from None
