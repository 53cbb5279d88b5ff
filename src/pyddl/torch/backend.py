"""`init_process_group("pyddl")`: a torch.distributed backend that runs on a pyddl Communicator.

Importing `pyddl.torch` registers it. Each process group of this backend (the world's, and every
`dist.new_group(...)`) builds an inner Gloo group (NCCL on CUDA) over its ranks, one more per slice
of each topology dim, and a pyddl Communicator over them: allreduce runs the algorithm of
PYDDL_ALLREDUCE (native or the multiring), reduce-scatter and allgather run the multiring's halves
(one ring per level, chunks pipelined), and every collective gets pyddl's cross-rank check and
named timeouts.
Caveats: Python backends go through the GIL; all_to_all of tensor lists and bitwise reductions
are not provided (they raise, naming the alternative). docs/backend.md.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from pyddl import env as _env
from pyddl.comm.communicator import DTYPES, Communicator
from pyddl.comm.guard import OpInfo
# The multiring's stages and pipeline, shared with its allreduce (private there: one user more).
from pyddl.comm.multiring import Level, run_stages_
from pyddl.config import PYDDL_TIMEOUT, Settings
from pyddl.errors import CollectiveTimeoutError
from pyddl.timeline import Timeline
from pyddl.topology.spec import Topology, parse_topology, servers_from_keys, sub_topology

__all__ = ["BACKEND_NAME", "ProcessGroupPyddl", "register"]

BACKEND_NAME = "pyddl"

_RedOp = dist.ReduceOp
_OPS = {_RedOp.SUM: "sum", _RedOp.AVG: "average", _RedOp.MIN: "min", _RedOp.MAX: "max",
        _RedOp.PRODUCT: "product", _RedOp.PREMUL_SUM: "sum"}


def _op_name(op) -> tuple[str, object]:
    """pyddl's name of a torch ReduceOp, and the PREMUL_SUM factor (None for the others)."""
    kind = op.op if isinstance(op, _RedOp) else op
    for red, name in _OPS.items():
        if kind == red:
            return name, (op.factor if kind == _RedOp.PREMUL_SUM else None)
    raise ValueError(f"the pyddl backend does not support ReduceOp {kind}; it reduces with SUM, AVG, MIN, MAX, "
                     "PRODUCT and PREMUL_SUM (for bitwise ops, use a Gloo group: dist.new_group(backend='gloo'))")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}[{','.join(map(str, t.shape))}]"


def _check(t: torch.Tensor, what: str) -> None:
    if t.dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TypeError(f"{what} has dtype {t.dtype}; the pyddl backend supports {names}")


class _Work(dist.Work):
    """The Work of one collective on the engine: wait() raises its error (the Work torch makes
    from a future would return True and drop it) and honours a timeout; get_future() fails too."""

    def __init__(self, handle, result: list, describe: str):
        super().__init__()
        self._result, self._describe = result, describe
        self._done = threading.Event()
        self._error: BaseException | None = None
        fut: torch.futures.Future = torch.futures.Future()

        def finished(_, error):
            self._error = error
            self._done.set()
            fut.set_result(error)

        handle.add_done_callback(finished)
        # Raising in a `then` callback is what marks a future failed for C++ (DDP's reducer);
        # Future.set_exception only wraps the error for Python's value().
        self._future = fut.then(lambda f: _raise(f.value()) or result)

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else 0
        if not self._done.wait(seconds if seconds > 0 else None):
            raise CollectiveTimeoutError(f"pyddl backend: {self._describe} did not complete within the "
                                         f"{seconds:g} s given to Work.wait()")
        _raise(self._error)
        return True

    def get_future(self) -> torch.futures.Future:
        return self._future

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self):
        return self._error

    def result(self) -> list:
        self.wait()
        return self._result


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _inner_group(store, prefix: str, members: list[int], me: int, timeout: timedelta, device: torch.device):
    """A real ProcessGroup over `members` (global ranks) on Gloo (NCCL for CUDA), entered in
    torch's maps of groups (not its list of names), so the rings' dist.isend/irecv with global
    ranks reach it; the owning ProcessGroupPyddl removes it on shutdown."""
    sub = dist.PrefixStore(prefix, store)
    rank, size = members.index(me), len(members)
    pg = dist.ProcessGroup(sub, rank, size)
    if device.type == "cuda":
        kind = dist.ProcessGroup.BackendType.NCCL
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        backend = dist.ProcessGroupNCCL(sub, rank, size, options)
    else:
        kind = dist.ProcessGroup.BackendType.GLOO
        backend = dist.ProcessGroupGloo(sub, rank, size, timeout=timeout)
    pg._set_default_backend(kind)
    pg._register_backend(device, kind, backend)
    world = dist.distributed_c10d._world
    world.pg_group_ranks[pg] = {g: i for i, g in enumerate(members)}
    world.pg_map[pg] = ("nccl" if device.type == "cuda" else "gloo", sub)  # its error logging asks
    return pg


def _topology(settings: Settings, store, ranks: list[int], me: int, world_size: int) -> Topology:
    """The group's topology: PYDDL_TOPOLOGY (of the job) restricted to the group's ranks, else
    its ranks grouped by server (the launcher's node rank, else the host), as pyddl.init does."""
    if settings.topology:
        world = parse_topology(settings.topology, world_size)
        return world if len(ranks) == world_size else sub_topology(world, ranks)
    try:
        job = _env.read_job_env()
        key = str(job.node_rank) if job.node_rank is not None and job.local_size is not None else None
    except ValueError:
        key = None
    store.set(f"pyddl/server/{me}", key or _env.host_identity())
    return servers_from_keys([store.get(f"pyddl/server/{r}").decode() for r in ranks])


class ProcessGroupPyddl(dist.ProcessGroup):
    """The process group of backend "pyddl": torch's collectives on a pyddl Communicator.

    Made by `dist.init_process_group("pyddl")` and `dist.new_group(..., backend="pyddl")`, not by
    hand. `communicator` is the Communicator underneath (its topology, settings, levels).
    """

    def __init__(self, comm: Communicator, inner, groups: list, name: str):
        super().__init__(comm.rank, comm.size)
        self.communicator = comm
        self._name = name
        self._inner = inner  # the whole group's Gloo/NCCL group: send/recv go there
        self._groups = groups

    def getBackendName(self) -> str:
        return BACKEND_NAME

    @property
    def group_name(self) -> str:
        # The C++ base reads the name from a registered backend, which a Python group has not.
        return self._name

    def __repr__(self) -> str:
        return f"ProcessGroupPyddl({self.communicator!r})"

    # Reductions ---------------------------------------------------------------------------

    def _reduce_input(self, tensors, opts, what: str):
        op, factor = _op_name(opts.reduceOp if opts is not None else _RedOp.SUM)
        for i, t in enumerate(tensors):
            _check(t, f"{what} tensor {i}")
            if factor is not None:  # PREMUL_SUM: each rank scales its input, then the sum
                t.mul_(factor)
        return op

    def allreduce(self, tensors, opts=None):
        op = self._reduce_input(tensors, opts, "allreduce")
        comm = self.communicator
        if len(tensors) == 1 and tensors[0].layout == torch.sparse_coo:  # DDP's sparse gradients, as Gloo
            return _Work(comm.sparse_allreduce_async(tensors[0], op=op, inplace=True), tensors, "allreduce")
        if len(tensors) == 1:
            return _Work(comm.allreduce_async_(tensors[0], op=op), tensors, "allreduce")
        return _Work(comm.grouped_allreduce_async_(tensors, op=op), tensors, "allreduce")

    def allreduce_coalesced(self, tensors, opts=None):
        op = self._reduce_input(tensors, opts, "allreduce_coalesced")
        return _Work(self.communicator.grouped_allreduce_async_(tensors, op=op), tensors, "allreduce_coalesced")

    def _reduce_scatter_base(self, output, input, opts=None):
        n = self.communicator.size
        if input.numel() != output.numel() * n:
            raise ValueError(f"reduce_scatter_tensor: the input has {input.numel()} elements, not the output's "
                             f"{output.numel()} x {n} ranks")
        op, factor = _op_name(opts.reduceOp if opts is not None else _RedOp.SUM)
        _check(input, "reduce_scatter input")
        return self._levels_job("reduce_scatter_tensor", input, output, op, factor)

    def reduce_scatter(self, outputs, inputs, opts=None):
        if len(outputs) != 1:
            raise ValueError("the pyddl backend reduce-scatters one output tensor per call")
        flat = torch.cat([t.reshape(-1) for t in inputs[0]])
        return self._reduce_scatter_base(outputs[0], flat, opts)

    # Gathers ----------------------------------------------------------------------------------

    def _allgather_base(self, output, input, opts=None):
        n = self.communicator.size
        if output.numel() != input.numel() * n:
            raise ValueError(f"all_gather_into_tensor: the output has {output.numel()} elements, not the input's "
                             f"{input.numel()} x {n} ranks")
        _check(input, "allgather input")
        return self._levels_job("all_gather_into_tensor", input, output, None, None)

    def allgather(self, outputs, inputs, opts=None):
        if len(inputs) != 1:
            raise ValueError("the pyddl backend gathers one input tensor per call")
        flat = torch.empty(inputs[0].numel() * self.communicator.size, dtype=inputs[0].dtype, device=inputs[0].device)

        def copy_out() -> None:
            for out, chunk in zip(outputs[0], flat.view(self.communicator.size, -1)):
                out.copy_(chunk.view_as(out))

        _check(inputs[0], "allgather input")
        return self._levels_job("all_gather", inputs[0], flat, None, None, copy_out, outputs)

    def _levels_job(self, name: str, input, output, op: str | None, factor, finish=None, result=None) -> dist.Work:
        """Reduce-scatter (op given) or allgather (op None) of equal blocks, one per rank, through
        the Communicator's topology levels: the multiring's two halves; then `finish()`."""
        comm = self.communicator
        info = OpInfo(name, f"{_describe(input)} -> {_describe(output)}" + (f" op={op}" if op else ""))

        def fn(seq: int) -> None:
            n, m = comm.size, (output.numel() if op is not None else input.numel())
            at = _place(comm.topology, comm.rank)
            blocks = _block_order(comm.topology)
            # Chunks of every rank's block flow through the levels' rings as a pipeline, as in
            # the multiring allreduce: chunk i crosses the servers while chunk i+1 is reduced
            # inside them. Each chunk buffer holds the n blocks' slices where the rings put them.
            width = max(1, comm.settings.chunk_bytes // (n * input.element_size()))
            spans = [(a, min(m, a + width)) for a in range(0, m, width)]
            if op is not None:
                # Each chunk buffer gets its slice of every block, in ring order, just before the
                # pipeline takes it in: one copy of the input, overlapping the earlier transfers.
                src, order = input.detach().reshape(n, m).to(comm.device), blocks.to(comm.device)
                bufs = [torch.empty(n * (b - a), dtype=input.dtype, device=comm.device) for a, b in spans]

                def fill(chunk: int) -> None:
                    a, b = spans[chunk]
                    torch.index_select(src[:, a:b], 0, order, out=bufs[chunk].view(n, b - a))
                    if factor is not None:
                        bufs[chunk].mul_(factor)

                flat = output.view(-1)

                def drain(chunk: int) -> None:
                    a, b = spans[chunk]
                    mine = bufs[chunk].view(n, b - a)[at]
                    if op == "average":
                        mine = mine.div_(n) if mine.is_floating_point() else mine.floor_divide_(n)
                    flat[a:b] = mine

                _through_levels(comm, bufs, op, seq, reduce=True, fill=fill, drain=drain)
            else:
                mine = input.detach().reshape(-1).to(comm.device)
                bufs = []
                for a, b in spans:
                    buf = torch.empty(n, b - a, dtype=input.dtype, device=comm.device)
                    buf[at] = mine[a:b]
                    bufs.append(buf.view(-1))
                rows, inverse = output.view(n, m), _inverse(blocks).to(comm.device)

                def drain(chunk: int) -> None:
                    a, b = spans[chunk]
                    rows[:, a:b] = bufs[chunk].view(n, b - a).index_select(0, inverse)

                _through_levels(comm, bufs, None, seq, reduce=False, drain=drain)
            if finish is not None:
                finish()

        return _Work(comm.run(info, fn, asynchronous=True), result or [output], name)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        # The engine runs them in order and fails every call after a failed one: the last Work
        # completes after all of them, and fails if any did.
        return [self._reduce_scatter_base(o, i, opts) for o, i in zip(outputs, inputs)][-1]

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        return [self._allgather_base(o, i, opts) for o, i in zip(outputs, inputs)][-1]

    # torch 2.14's names of the same calls
    reduce_scatter_single = _reduce_scatter_base
    all_gather_single = _allgather_base
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced
    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        comm, inner = self.communicator, self._inner
        _check(input, "alltoall input")
        # Ranks send different splits: only the dtype is compared across ranks.
        info = OpInfo("all_to_all_single", str(input.dtype))

        def fn(seq: int) -> None:
            dist.all_to_all_single(output, input, output_split_sizes or None, input_split_sizes or None, group=inner)

        return _Work(comm.run(info, fn, asynchronous=True), [output], "all_to_all_single")

    all_to_all_single = alltoall_base

    def broadcast(self, tensors, opts=None):
        if len(tensors) != 1:
            raise ValueError("the pyddl backend broadcasts one tensor per call")
        _check(tensors[0], "broadcast tensor")
        root = opts.rootRank if opts is not None else 0
        return _Work(self.communicator.broadcast_async_(tensors[0], root=root), tensors, "broadcast")

    def barrier(self, opts=None):
        comm = self.communicator
        handle = comm.run(OpInfo("barrier", ""), lambda seq: dist.barrier(group=self._inner) if comm.size > 1 else None,
                          asynchronous=True)
        return _Work(handle, [], "barrier")

    # Point to point: the inner group's, unchecked (no collective to compare) ---------------

    def send(self, tensors, dst: int, tag: int = 0):
        return self._inner.send(tensors, dst, tag)

    def recv(self, tensors, src: int, tag: int = 0):
        return self._inner.recv(tensors, src, tag)

    def recv_anysource(self, tensors, tag: int = 0):
        return self._inner.recv_anysource(tensors, tag)

    # Rooted collectives, on the ones above (every rank moves the whole result: the object
    # collectives torch.distributed.checkpoint uses are small) ---------------------------------

    def reduce(self, tensors, opts=None):
        # An allreduce: torch leaves the non-root ranks' tensors unspecified after a reduce.
        return self.allreduce(tensors, opts)

    def gather(self, outputs, inputs, opts=None):
        root, n = (opts.rootRank if opts is not None else 0), self.communicator.size
        _check(inputs[0], "gather input")
        flat = torch.empty(inputs[0].numel() * n, dtype=inputs[0].dtype, device=inputs[0].device)

        def copy_out() -> None:
            if self.communicator.rank == root:
                for out, chunk in zip(outputs[0], flat.view(n, -1)):
                    out.copy_(chunk.view_as(out))

        return self._levels_job(f"gather(root={root})", inputs[0], flat, None, None, copy_out, outputs)

    def scatter(self, outputs, inputs, opts=None):
        comm, root = self.communicator, (opts.rootRank if opts is not None else 0)
        out = outputs[0]
        _check(out, "scatter output")

        def fn(seq: int) -> None:
            if comm.rank == root:
                flat = torch.cat([t.reshape(-1) for t in inputs[0]]).to(comm.device)
            else:
                flat = torch.empty(out.numel() * comm.size, dtype=out.dtype, device=comm.device)
            if comm.size > 1:
                dist.broadcast(flat, src=comm.ranks[root], group=self._inner)
            out.copy_(flat.view(comm.size, -1)[comm.rank].view_as(out))

        info = OpInfo("scatter", f"{_describe(out)} root={root}")
        return _Work(comm.run(info, fn, asynchronous=True), outputs, "scatter")

    # Not provided ------------------------------------------------------------------------------

    def alltoall(self, outputs, inputs, opts=None):
        raise NotImplementedError("the pyddl backend does not provide all_to_all on tensor lists; use "
                                  "all_to_all_single, or run it on a Gloo group (dist.new_group(backend='gloo'))")

    def shutdown(self) -> None:
        """Stop the Communicator's threads and free the inner groups (torch calls this from
        destroy_process_group)."""
        self.communicator.close()
        world = dist.distributed_c10d._world
        for pg in self._groups:
            world.pg_group_ranks.pop(pg, None)
            world.pg_map.pop(pg, None)
        self._groups = []


def _place(topo: Topology, rank: int) -> int:
    """Where the multiring leaves rank `rank`'s block of an n-block buffer: after reduce-scattering
    along the dims innermost first, coordinates (c0, c1, ...) hold block c0*d1*d2... + c1*d2... + ..."""
    at, stride = 0, topo.size
    for c, d in zip(topo.coords(rank), topo.dims):
        stride //= d
        at += c * stride
    return at


def _block_order(topo: Topology) -> torch.Tensor:
    """order[p] = the rank whose block sits at place p."""
    order = torch.empty(topo.size, dtype=torch.int64)
    for r in range(topo.size):
        order[_place(topo, r)] = r
    return order


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """inverse[r] = the place of rank r's block (order[p] = the rank at place p)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse


def _through_levels(comm: Communicator, bufs: list[torch.Tensor], op: str | None, seq: int, reduce: bool,
                    fill=None, drain=None) -> None:
    """Run the multiring's reduce-scatter half (innermost level first) or its allgather half
    (outermost first) on each chunk buffer, pipelined over the chunks (one after another on NCCL,
    which matches messages by order, not tag); `fill(chunk)` prepares a buffer just in time and
    `drain(chunk)` unpacks it as soon as it is done."""
    run_stages_(bufs, op or "sum", comm.levels, seq, "reduce_scatter" if reduce else "allgather",
                comm.backend != "nccl", fill, drain)


def _create(opts, backend_options) -> ProcessGroupPyddl:
    """The creator torch calls for each group of backend "pyddl" (extended API)."""
    size, timeout = opts.group_size, opts.timeout
    ranks = list(opts.global_ranks_in_group) or list(range(size))  # empty: the world group
    world_size = size if not opts.global_ranks_in_group else dist.get_world_size()
    me = ranks[opts.group_rank]
    settings = Settings.from_env()
    if not os.environ.get(PYDDL_TIMEOUT):  # init_process_group(timeout=) unless pyddl run set one
        settings = settings.replace(timeout_s=timeout.total_seconds())
    timeout = timedelta(seconds=settings.timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if _wants_cuda() else torch.device("cpu")
    store = opts.store
    topo = _topology(settings, store, ranks, me, world_size)
    whole = _inner_group(store, "pyddl/all/", ranks, me, timeout, device)
    groups, levels = [whole], []
    for dim, d in enumerate(topo.dims):
        if d == 1:
            continue
        for index, local in enumerate(topo.slices(dim)):
            members = [ranks[i] for i in local]
            if me not in members:
                continue
            group = _inner_group(store, f"pyddl/dim{dim}/{index}/", members, me, timeout, device)
            # A 2-rank ring gets one connection per direction (see pyddl.comm.multiring.Level).
            reverse = _inner_group(store, f"pyddl/dim{dim}/{index}/r/", members, me, timeout, device) if d == 2 else None
            groups += [g for g in (group, reverse) if g is not None]
            levels.append(Level(d, tuple(members), members.index(me), group, reverse))
    comm = Communicator(name=f"pg{opts.group_id}", ranks=ranks, job_rank=me, topology=topo, settings=settings,
                        backend="nccl" if device.type == "cuda" else "gloo", device=device, group=whole,
                        levels=levels, store=store if size > 1 else None, timeline=Timeline(None, me, world_size),
                        root=None)
    return ProcessGroupPyddl(comm, whole, groups, opts.group_id)


def _wants_cuda() -> bool:
    return torch.cuda.is_available() and dist.is_nccl_available()


def register() -> None:
    """Register backend "pyddl" with torch.distributed (again: harmless). Importing pyddl.torch
    does it, and so does torch itself through the "torch.distributed.backends" entry point when
    a script asks for "pyddl" without importing pyddl."""
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu", "cuda"])


register()
