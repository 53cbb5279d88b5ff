"""Wire codecs: cast a floating-point buffer for the wire, then back into its own dtype.

fp16 has a narrow range, so a sum is pre-divided by the number of ranks before the cast and
multiplied back after, as PyTorch's fp16_compress_hook divides by the world size. Integer
tensors are never compressed.
"""

from __future__ import annotations

import torch

from pyddl.comm import registry

__all__ = ["Codec", "get_codec", "CODECS"]


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

    def encode(self, tensor: torch.Tensor, op: str, world_size: int) -> torch.Tensor:
        """Return the wire tensor; for sum/average it carries tensor / world_size.

        The division happens in the tensor's own dtype, in the same pass as the cast, so a
        value that fits fp16 only after the division (above 65504) does not become inf.
        """
        wire = torch.empty(tensor.shape, dtype=self.wire_dtype, device=tensor.device)
        if op in ("sum", "average"):
            return torch.div(tensor, world_size, out=wire)
        return wire.copy_(tensor)

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
