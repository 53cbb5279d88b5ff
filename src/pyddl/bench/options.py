"""The allreduce bench's option values, parsed without torch: the command line checks them
before it launches anything or loads a framework, so a typo costs a fraction of a second."""

from __future__ import annotations

__all__ = ["parse_size", "parse_dtype_name", "parse_tensors", "DTYPE_NAMES", "TENSORS"]

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
# The element types a row may move: the floating types gradients travel in (fp16 and bf16 are
# what a compressed wire carries, so their rows show the cost of that traffic alone).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Where each call's tensor comes from: one buffer reused by every call (the best case, what
# nccl-tests times), a new tensor per call reduced in place (`allreduce_`, as gradients are
# new every step) or a new tensor per call reduced out of place (`allreduce`, the README's
# first example). The new tensor is made inside the timed call, as a user's code makes it.
TENSORS = ("reused", "fresh", "out")


def parse_size(text: str) -> int:
    """Parse "64M", "512K", "1G" or a byte count into bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix, e.g. 64M") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value * _UNITS[unit])


def parse_dtype_name(text: str) -> str:
    """Parse "float32", "float16" or "bfloat16" (also "fp32", "fp16", "bf16") to its name."""
    name = _DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {text!r} is not one of {', '.join(DTYPE_NAMES)}")
    return name


def parse_tensors(text: str) -> list[str]:
    """Parse "reused,fresh,out" (any subset, in that order of appearance)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TENSORS]
    if unknown or not kinds:
        raise ValueError(f"tensors {text!r}: choose from {', '.join(TENSORS)}")
    return kinds
