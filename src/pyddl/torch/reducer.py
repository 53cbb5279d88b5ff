"""Gradient reduction overlapped with backward: buckets in ready order, launched in one order.

Each parameter gets a post-accumulate-grad hook. When a bucket's last gradient is ready (on
the k-th backward pass with gradient accumulation) and every bucket before it has been
launched, it is handed to the engine, which packs, allreduces and unpacks it while backward
goes on. Buckets are launched strictly by index, so every rank issues the same collectives
in the same order (DDP does the same, Li et al. VLDB 2020). The first layout is the reverse
parameter order; after the first step it is rebuilt from the order gradients really became
ready (rank 0's order, broadcast, so all ranks agree).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

import pyddl
from pyddl import defaults
from pyddl.comm.codecs import get_codec
from pyddl.comm.fusion import Part, pack, unpack
from pyddl.comm.layout import plan_buckets
from pyddl.comm.guard import OpInfo
from pyddl.errors import CollectiveMismatchError

__all__ = ["GradientReducer", "ReducerOptions", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = defaults.GRADIENT_BUCKET_BYTES  # why 2 MiB: see pyddl/defaults.py


@dataclass(frozen=True)
class ReducerOptions:
    op: str = "average"  # core op name
    codec: str | None = None  # core codec name, or None with `compressor`
    compressor: object = None  # a Horovod-style Compressor without a core codec
    algorithm: str | None = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    backward_passes_per_step: int = 1
    prescale: float = 1.0
    postscale: float = 1.0
    # Densify sparse gradients (nn.Embedding(sparse=True)) and reduce them with the rest, as
    # Horovod's flag does; otherwise, from the second step (or the first, for those in
    # sparse_from_start), each is allgathered (its rows).
    sparse_as_dense: bool = False
    # Parameters whose gradients are known to be sparse before the first step, by name, with
    # their sparse_dim: reduced sparse from the first step. Every rank must pass the same.
    sparse_from_start: tuple[tuple[str, int], ...] = ()


@dataclass
class _Bucket:
    index: int
    members: list[int]  # indices into the reducer's parameter list
    waiting: int = 0  # gradients not yet ready this step
    handle: object = None
    offset: int = 0  # where its wire buffer starts in the buffer of its dtype (GradientReducer._wire)
    sparse_dim: int | None = None  # a bucket of one sparse gradient, reduced by sparse_allreduce


@dataclass
class _StepState:
    launched_upto: int = 0  # buckets [0, launched_upto) are handed to the engine
    ready_order: list[int] = field(default_factory=list)
    first_ready_us: float = 0.0
    last_ready_us: float = 0.0


class GradientReducer:
    """Allreduce the gradients of `named_params` as they become ready.

    Args:
        named_params: (name, parameter) pairs; parameters without requires_grad are skipped.
        options: how to reduce (op, codec, algorithm, bucket size, accumulation, scaling).
        comm: the Communicator whose ranks reduce (default: the world).
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], options: ReducerOptions, comm=None):
        self.options = options
        self._comm = pyddl.world() if comm is None else comm
        self._comm.check_algorithm(options.algorithm)  # a bad name fails here; "auto" tunes here
        self.names = [n for n, p in named_params if p.requires_grad]
        self.params = [p for _, p in named_params if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        # Parameters whose gradient arrived sparse, with its sparse_dim: given back sparse
        # (also with sparse_as_dense, as Horovod does).
        position = {name: i for i, name in enumerate(self.names)}
        self._sparse_dims: dict[int, int] = {position[n]: d for n, d in options.sparse_from_start if n in position}
        # Parameters whose buckets reduce them sparse (rank 0's _sparse_dims at the rebuild).
        self._sparse_buckets: dict[int, int] = dict(self._sparse_dims) if self._reduces_sparse() else {}
        self._passes = [0] * len(self.params)
        self._lock = threading.Lock()
        self._step = _StepState()
        self._rebuilt = False
        self._timeline = self._comm.timeline
        order = list(reversed(range(len(self.params))))
        self._set_layout(self._plan(order, first_bucket_bytes=defaults.FIRST_GRADIENT_BUCKET_BYTES))
        self._check_layout_across_ranks()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    # Layout -----------------------------------------------------------------------------

    def _plan(self, order: list[int], first_bucket_bytes: int | None = None) -> list[list[int]]:
        """Buckets of the parameters in `order`: the dense ones by plan_buckets, and each one in
        `_sparse_buckets` alone, all in the order of their first parameter."""
        dense = [i for i in order if i not in self._sparse_buckets]
        items = [(self.params[i].numel(), str(self.params[i].dtype), self.params[i].element_size()) for i in dense]
        buckets = [[dense[i] for i in b] for b in plan_buckets(items, self.options.bucket_bytes, first_bucket_bytes)]
        buckets += [[i] for i in order if i in self._sparse_buckets]
        place = {i: k for k, i in enumerate(order)}
        return sorted(buckets, key=lambda b: place[b[0]])

    def _set_layout(self, layout: list[list[int]]) -> None:
        self.buckets = [_Bucket(i, members, sparse_dim=self._sparse_buckets.get(members[0]))
                        for i, members in enumerate(layout)]
        # The wire buffers of the buckets of one dtype lie back to back in one tensor, in launch
        # order, so that buckets queued together share the multiring's chunks (allreduce_many_).
        self._wire_numel: dict[torch.dtype, int] = {}
        self._wires: dict[tuple[torch.dtype, torch.dtype], torch.Tensor] = {}
        for b in self.buckets:
            if b.sparse_dim is not None:
                continue
            dtype = self.params[b.members[0]].dtype
            b.offset = self._wire_numel.get(dtype, 0)
            self._wire_numel[dtype] = b.offset + sum(self.params[m].numel() for m in b.members)
        self._bucket_of = {}
        for b in self.buckets:
            for m in b.members:
                self._bucket_of[m] = b
        self._reset_step()

    def layout(self) -> list[list[str]]:
        """The current buckets, as parameter names, in launch order."""
        return [[self.names[m] for m in b.members] for b in self.buckets]

    def _check_layout_across_ranks(self) -> None:
        """Every rank must hold the same parameters (names, shapes, dtypes) in the same buckets."""
        import torch.distributed as dist

        mine = [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(self.names, self.params)]
        layout = [b.members for b in self.buckets]

        def fn(seq):
            everyone: list = [None] * self._comm.size
            dist.all_gather_object(everyone, (mine, layout), group=self._comm.group)
            return everyone

        everyone = self._comm.run(OpInfo("optimizer_layout_check", ""), fn)
        ref_params, ref_layout = everyone[0]
        for rank, (params, lay) in enumerate(everyone):
            if params == ref_params and lay == ref_layout:
                continue
            for i in range(max(len(params), len(ref_params))):
                a = ref_params[i] if i < len(ref_params) else None
                b = params[i] if i < len(params) else None
                if a != b:
                    raise CollectiveMismatchError(
                        f"pyddl: the model differs across ranks at parameter #{i}: rank 0 has "
                        f"{_describe_param(a)}, rank {rank} has {_describe_param(b)}. Build the same "
                        "model on every rank (and pass the same named_parameters)."
                    )
            raise CollectiveMismatchError(
                f"pyddl: gradient buckets differ between rank 0 {ref_layout} and rank {rank} {lay}; "
                "pass the same bucket size on every rank"
            )

    # Per step ---------------------------------------------------------------------------

    def _reset_step(self) -> None:
        for b in self.buckets:
            b.waiting = len(b.members)
            b.handle = None
        self._step = _StepState()

    def pending(self) -> bool:
        """Whether any gradient of this step was seen or any bucket launched."""
        return self._step.launched_upto > 0 or any(b.waiting < len(b.members) for b in self.buckets)

    def _on_grad(self, param: torch.Tensor) -> None:
        i = self._index[id(param)]
        with self._lock:
            self._passes[i] += 1
            k = self.options.backward_passes_per_step
            if self._passes[i] > k:
                raise RuntimeError(
                    f"pyddl: the gradient of {self.names[i]!r} was computed more than "
                    f"backward_passes_per_step={k} times before optimizer.step(); increase "
                    "backward_passes_per_step to accumulate gradients locally"
                )
            if self._passes[i] < k:
                return
            now = self._timeline.now_us() if self._timeline.enabled else 0.0
            if not self._step.ready_order:
                self._step.first_ready_us = now
            self._step.last_ready_us = now
            self._step.ready_order.append(i)
            bucket = self._bucket_of[i]
            bucket.waiting -= 1
            if bucket.waiting == 0:
                self._timeline.instant(f"bucket {bucket.index} ready", "compute")
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._step.launched_upto < len(self.buckets):
            bucket = self.buckets[self._step.launched_upto]
            if bucket.waiting:
                return
            bucket.handle = self._launch(bucket)
            self._step.launched_upto += 1

    def _launch(self, bucket: _Bucket):
        if bucket.sparse_dim is not None:
            return self._launch_sparse(bucket)
        opts = self.options
        params = [self.params[m] for m in bucket.members]
        for m, p in zip(bucket.members, params):
            if p.grad is None:  # unused this step on this rank: contribute zeros (as Horovod)
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse:  # summed dense in the bucket: the same sum as Horovod's allgather
                self._sparse_dims[m] = p.grad.sparse_dim()
                p.grad = p.grad.to_dense()
        grads = [p.grad for p in params]
        shapes = ",".join(f"{tuple(g.shape)}" for g in grads)
        op = self._collective_op()
        alg = self._comm.check_algorithm(opts.algorithm)
        codec = get_codec(opts.codec)
        numel = sum(g.numel() for g in grads)
        fused = opts.compressor is None and codec.applies_to(grads[0])
        if fused:
            # Pack straight into the wire dtype and unpack straight back: two passes over the
            # gradients instead of four (pack, encode, decode, unpack). On a CPU shared with
            # compute, those passes are taken from the step. Sums are pre-divided by the world
            # size (fp16 range), so the wire carries averages.
            world = self._comm.size
            additive = op in ("sum", "average")
            wire_op = "sum" if additive else op
            pre = opts.prescale / world if additive else opts.prescale
            post = opts.postscale * (world if op == "sum" else 1)
            buffer_dtype, codec = codec.wire_dtype, get_codec(None)
            spec = (((numel, str(buffer_dtype)),), wire_op, alg, "none")
        else:
            wire_op, pre, post, buffer_dtype = op, opts.prescale, opts.postscale, grads[0].dtype
            # A user's own Compressor may change the wire dtype: joined ranks cannot serve it.
            spec = None if opts.compressor is not None else (((numel, str(buffer_dtype)),), op, alg, codec.name)
        info = OpInfo("gradient_bucket", f"#{bucket.index} {grads[0].dtype} [{shapes}] op={opts.op} "
                      f"algorithm={alg} wire={buffer_dtype}", join_spec=spec)

        def buffer() -> torch.Tensor:
            return self._wire(grads[0].dtype, buffer_dtype)[bucket.offset : bucket.offset + numel]

        def fill(flat: torch.Tensor) -> None:
            # Scaled in the gradients' dtype before any cast, so fp16 does not overflow.
            pack([g.detach() for g in grads], out=flat, scale=pre)

        def finish(flat: torch.Tensor) -> None:
            if fused:
                unpack(flat, [g.detach() for g in grads])
                if post != 1.0:
                    for g in grads:  # in the gradient's own dtype: no fp16 overflow
                        g.mul_(post)
                return
            if post != 1.0:
                flat.mul_(post)
            unpack(flat, [g.detach() for g in grads])

        part = None
        if opts.compressor is None and self._comm.fusable(alg, numel):
            part = Part(str(buffer_dtype), wire_op, alg, buffer, fill, finish)

        def fn(seq: int):
            flat = buffer()
            fill(flat)
            if opts.compressor is None:
                self._comm.reduce_buffer_(flat, wire_op, alg, codec, seq)
            else:
                wire, ctx = opts.compressor.compress(flat)
                self._comm.reduce_buffer_(wire, op, alg, codec, seq)
                flat.copy_(opts.compressor.decompress(wire, ctx))
            finish(flat)

        return self._comm.run(info, fn, asynchronous=True, part=part)

    def _launch_sparse(self, bucket: _Bucket):
        """Allgather one sparse gradient's rows and values and sum them into it (Horovod's
        sparse allreduce); the rest of the scaling is done in synchronize()."""
        (m,) = bucket.members
        p, opts = self.params[m], self.options
        if p.grad is None:  # unused this step on this rank: no rows
            rows = torch.empty((bucket.sparse_dim, 0), dtype=torch.int64, device=p.device)
            values = torch.empty((0,) + tuple(p.shape[bucket.sparse_dim:]), dtype=p.dtype, device=p.device)
            p.grad = torch.sparse_coo_tensor(rows, values, p.shape)
        elif not p.grad.is_sparse:
            p.grad = p.grad.to_sparse(bucket.sparse_dim)
        if opts.prescale != 1.0:
            p.grad.mul_(opts.prescale)
        return self._comm.sparse_allreduce_async(p.grad, op=self._collective_op(), inplace=True)

    def _collective_op(self) -> str:
        """The op the collective runs: a plain sum where the gradients are scaled around it
        (prescale before, postscale after), else the options' op."""
        opts = self.options
        return "sum" if opts.prescale != 1.0 or opts.postscale != 1.0 else opts.op

    def _wire(self, dtype: torch.dtype, wire_dtype: torch.dtype) -> torch.Tensor:
        """(Engine thread.) The wire buffer of every bucket of gradients of `dtype`, allocated
        at first use and kept: one per layout."""
        wire = self._wires.get((dtype, wire_dtype))
        if wire is None:
            wire = torch.empty(self._wire_numel[dtype], dtype=wire_dtype, device=self._comm.device)
            self._wires[(dtype, wire_dtype)] = wire
        return wire

    def synchronize(self) -> None:
        """Launch what is left (filling unused gradients with zeros), wait for every bucket."""
        with self._lock:
            for b in self.buckets[self._step.launched_upto:]:
                for m in b.members:
                    if self._passes[m] < self.options.backward_passes_per_step:
                        self._passes[m] = self.options.backward_passes_per_step
                b.waiting = 0
            self._launch_ready()
        backward_end = self._timeline.now_us() if self._timeline.enabled else 0.0
        for b in self.buckets:
            b.handle.wait()
            if b.sparse_dim is not None and self.options.postscale != 1.0:
                self.params[b.members[0]].grad.mul_(self.options.postscale)
        for m, sparse_dim in self._sparse_dims.items():  # the ones summed dense in a bucket
            if m not in self._sparse_buckets:
                self.params[m].grad = self.params[m].grad.to_sparse(sparse_dim)
        if self._timeline.enabled:
            st = self._step
            if st.ready_order:
                self._timeline.span("backward", st.first_ready_us, st.last_ready_us, "compute")
            self._timeline.span("wait for gradients", backward_end, self._timeline.now_us(), "compute")
        order = self._step.ready_order
        self._passes = [0] * len(self.params)
        if self._rebuilt:
            self._reset_step()
            return
        # Every rank rebuilds at its first synchronize (a collective); parameters that got no
        # gradient keep their reverse-registration place at the end.
        seen = set(order)
        self._rebuild(order + [i for i in reversed(range(len(self.params))) if i not in seen])

    def _rebuild(self, order: list[int]) -> None:
        # Rank 0's observed order decides, so all ranks agree on the new layout; so does its
        # view of which gradients are sparse (sparse_dim + 1 per parameter, 0: dense).
        self._rebuilt = True
        sparse = self._sparse_dims if self._reduces_sparse() else {}
        plan_t = torch.tensor(order + [sparse.get(i, -1) + 1 for i in range(len(self.params))], dtype=torch.int64)
        self._comm.broadcast_(plan_t, root=0)
        plan = plan_t.tolist()
        n = len(self.params)
        self._sparse_buckets = {i: d - 1 for i, d in enumerate(plan[n:]) if d}
        self._set_layout(self._plan(plan[:n]))

    def _reduces_sparse(self) -> bool:
        """Whether sparse gradients get buckets of their own: Horovod's sparse allreduce sums
        (or averages) them, so not with sparse_as_dense or op min/max/product."""
        return not self.options.sparse_as_dense and self.options.op in ("sum", "average")


def _describe_param(entry) -> str:
    if entry is None:
        return "no parameter there"
    name, shape, dtype = entry
    return f"{name!r} {dtype.replace('torch.', '')}{list(shape)}"
