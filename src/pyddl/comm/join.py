"""join(): a rank that has run out of data serves the others' allreduces until every rank has
joined, contributing the identity element of each reduction (Horovod's join semantics)."""

from __future__ import annotations

import torch

from pyddl.comm import registry
from pyddl.comm.codecs import get_codec
from pyddl.comm.guard import NamesDiffer, Round, exchange
from pyddl.errors import CollectiveMismatchError, PyddlError

__all__ = ["serve_until_all_joined", "identity"]


def identity(op: str, dtype: torch.dtype, numel: int, device) -> torch.Tensor:
    """The element that leaves a reduction unchanged: what a joined rank contributes."""
    if op in ("sum", "average"):
        return torch.zeros(numel, dtype=dtype, device=device)
    if op == "product":
        return torch.ones(numel, dtype=dtype, device=device)
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    fill = (float("inf") if op == "min" else float("-inf")) if dtype.is_floating_point else (info.max if op == "min" else info.min)
    return torch.full((numel,), fill, dtype=dtype, device=device)


def serve_until_all_joined(comm, seq: int) -> Round:
    """The join collective's body (engine thread): one exchange per collective the others run.
    Where they are at different names, this rank takes part in their negotiation, offering
    none: it serves whichever they agree on. A call of theirs that cannot run (a mismatch, or
    one that joined ranks cannot serve) raises on them only, as in Horovod: this rank goes on."""
    while True:
        try:
            rnd = exchange(None, seq, comm.group, comm.ranks, comm.device, comm.rank)
        except NamesDiffer as differ:
            comm._negotiate(seq, differ.listing, joined=True)
            continue
        except CollectiveMismatchError:
            continue  # the others' call failed before moving data; they raise it, this rank serves on
        if rnd.all_joined:
            return rnd
        (buffers, op, alg, codec), op_seq = rnd.serve
        if alg == registry.AUTO:
            if comm._tuned is None:
                raise PyddlError("an auto allreduce ran while ranks were joined before auto was tuned; "
                                 "start the job with allreduce='auto' so every rank tunes at init")
            alg = None
        for numel, dtype_name in buffers:
            buf = identity(op, getattr(torch, dtype_name.replace("torch.", "")), numel, comm.device)
            chosen = alg or comm._tuned.pick(buf.numel() * buf.element_size())
            comm.reduce_buffer_(buf, op, chosen, get_codec(codec), op_seq)
