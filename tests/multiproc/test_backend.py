"""Backend "pyddl" (`init_process_group("pyddl")`) on 4 Gloo ranks as 2 servers x 2: DDP and
FSDP2 train to the same parameters as on Gloo, reduce_scatter_tensor and all_gather_into_tensor
are exact on integers, and mismatched shapes, unsupported ops and a missing rank are clear errors."""

import pytest
import torch

from harness import run_ranks, wait_for_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(170)]

ENV = {"PYDDL_TOPOLOGY": "2x2", "PYDDL_CHUNK_BYTES": "4096", "LOCAL_WORLD_SIZE": "2"}
STEPS = 5
TOL = dict(rtol=1e-5, atol=1e-6)  # summation order differs between Gloo's ring and the multiring


def _groups(algorithms=("native", "multiring")):
    """The default group (backend pyddl, PYDDL_ALLREDUCE native), Gloo's, and more pyddl groups."""
    import os

    import torch.distributed as dist

    import pyddl.torch  # noqa: F401  (registers "pyddl"; the entry point would too)

    dist.init_process_group("pyddl")
    groups = {"gloo": dist.new_group(backend="gloo"), "native": dist.group.WORLD}
    for alg in algorithms:
        if alg != "native":
            os.environ["PYDDL_ALLREDUCE"] = alg  # read when the group is created
            groups[alg] = dist.new_group(backend="pyddl")
    return groups


def _model(unused: bool = False):
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 9)
            self.b = torch.nn.Linear(9, 3)
            self.spare = torch.nn.Linear(9, 3) if unused else None  # never used: find_unused_parameters

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    return Net()


def _batch(rank: int, step: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _train_ddp(group, variant: str, rank: int) -> list[torch.Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(unused=variant == "find_unused")
    ddp = DDP(model, process_group=group, find_unused_parameters=variant == "find_unused",
              static_graph=variant == "static_graph", bucket_cap_mb=0.0005)  # several buckets
    if variant == "hook":
        ddp.register_comm_hook(group, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        if variant == "no_sync":  # two micro-batches, gradients reduced once
            with ddp.no_sync():
                x, y = _batch(rank, step, 1)
                torch.nn.functional.mse_loss(ddp(x), y).backward()
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _ddp_everywhere(rank, world):
    import torch.distributed as dist

    groups = _groups()
    initial = [p.detach().clone() for p in _model().parameters()]
    out = {"backends": {name: dist.get_backend(g) for name, g in groups.items()}, "params": {}, "initial": initial}
    for variant in ("plain", "hook", "no_sync", "static_graph", "find_unused"):
        for name, group in groups.items():
            out["params"][variant, name] = _train_ddp(group, variant, rank)
    dist.destroy_process_group()
    return out


def test_ddp_on_pyddl_equals_gloo_native_and_multiring_with_hook_no_sync_static_graph_and_unused():
    results = run_ranks(_ddp_everywhere, 4, env=ENV, timeout=160)
    for rank, out in enumerate(results):
        assert out["backends"] == {"gloo": "gloo", "native": "pyddl", "multiring": "pyddl"}
        for (variant, name), params in out["params"].items():
            reference = out["params"][variant, "gloo"]
            for got, want in zip(params, reference):
                torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank} {variant} on {name}")
            # Same on every rank (DDP kept replicas in sync), and training moved the weights.
            for got, want in zip(params, results[0]["params"][variant, name]):
                torch.testing.assert_close(got, want, **TOL)
        assert not torch.allclose(out["params"]["plain", "native"][0], out["initial"][0])


def _fsdp2(rank, world, checkpoint_dir):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    groups = _groups()
    out = {}
    for name, group in groups.items():
        model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 7),
                                    torch.nn.Tanh(), torch.nn.Linear(7, 3))  # shards of uneven size
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p)
        out["initial"] = [p.detach().clone() for p in model.parameters()]
        out[name, "backend"] = dist.get_backend(group)
        mesh = DeviceMesh.from_group(group, "cpu")
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _batch(rank, step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        out[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
        if name == "multiring":  # torch.distributed.checkpoint on the default group (pyddl): save, perturb, load
            dcp.save(model.state_dict(), checkpoint_id=checkpoint_dir)
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            state = model.state_dict()
            dcp.load(state, checkpoint_id=checkpoint_dir)
            model.load_state_dict(state)
            out["reloaded"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    dist.destroy_process_group()
    return out


def test_fsdp2_on_pyddl_trains_to_gloos_parameters_and_checkpoints_with_dcp(tmp_path):
    results = run_ranks(_fsdp2, 4, str(tmp_path / "ckpt"), env=ENV, timeout=160)
    for rank, out in enumerate(results):
        for name in ("native", "multiring"):
            assert out[name, "backend"] == "pyddl"
            for got, want in zip(out[name], out["gloo"]):
                torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank} FSDP2 on {name}")
        assert not torch.allclose(out["native"][0], out["initial"][0])  # it trained
        for got, want in zip(out["reloaded"], out["multiring"]):
            assert torch.equal(got, want), f"rank {rank}: dcp.load did not restore what dcp.save wrote"


def _scatter_gather(rank, world):
    import torch.distributed as dist

    from pyddl.comm.communicator import DTYPES

    groups = _groups(("native",))
    group = groups["native"]
    ReduceOp = dist.ReduceOp
    got = {}
    for dtype in DTYPES:
        floating = dtype.is_floating_point
        ops = [("sum", ReduceOp.SUM), ("max", ReduceOp.MAX), ("min", ReduceOp.MIN), ("avg", ReduceOp.AVG)]
        if floating:
            ops.append(("premul", ReduceOp.PREMUL_SUM(0.5)))
        for shape in ((0,), (1,), (5,), (2, 3), (700,)):  # per-rank blocks: empty, tiny, odd, 2-D, pipelined
            block = torch.Size(shape).numel()
            base = torch.arange(world * block).reshape((world,) + shape) % 7 + 1
            for name, op in ops:
                inp = (base * (rank + 1)).to(dtype).reshape((world * shape[0],) + shape[1:])
                out = torch.full(shape, -1).to(dtype)
                dist.reduce_scatter_tensor(out, inp, op=op, group=group)
                got["rs", str(dtype), shape, name] = out
            gathered = torch.full((world * shape[0],) + shape[1:], -1).to(dtype)
            mine = (torch.arange(block).reshape(shape) % 5 + 10 * rank).to(dtype)
            dist.all_gather_into_tensor(gathered, mine, group=group)
            got["ag", str(dtype), shape] = gathered
    # A group of one rank: nothing to move, the output is the input (chunked: 700 elements).
    solo = [dist.new_group([r], backend="pyddl") for r in range(world)][rank]
    out = torch.zeros(700, dtype=torch.int64)
    dist.reduce_scatter_tensor(out, torch.arange(700) + rank, group=solo)
    gathered = torch.zeros(700, dtype=torch.int64)
    dist.all_gather_into_tensor(gathered, torch.arange(700) * rank, group=solo)
    got["solo"] = (out.tolist() == list(range(rank, 700 + rank)), gathered.tolist() == [i * rank for i in range(700)])
    # Rooted collectives (what torch.distributed.checkpoint's object collectives run on)
    summed = torch.tensor([rank + 1])
    dist.reduce(summed, dst=1)
    pieces = [torch.zeros(2, dtype=torch.int64) for _ in range(world)] if rank == 2 else None
    dist.gather(torch.tensor([rank, 7 * rank]), pieces, dst=2)
    part = torch.zeros(2, dtype=torch.int64)
    dist.scatter(part, [torch.tensor([10 * r, 10 * r + 1]) for r in range(world)] if rank == 3 else None, src=3)
    objects = [None] * world
    dist.gather_object({"rank": rank}, objects if rank == 0 else None, dst=0)
    picked = [None]
    dist.scatter_object_list(picked, [f"to {r}" for r in range(world)] if rank == 1 else None, src=1)
    got["rooted"] = (summed.item() if rank == 1 else None, [p.tolist() for p in pieces] if pieces else None,
                     part.tolist(), objects if rank == 0 else None, picked[0])
    dist.destroy_process_group()
    return got


def test_reduce_scatter_all_gather_and_rooted_collectives_exact_for_every_dtype_and_uneven_shape():
    from pyddl.comm.communicator import DTYPES

    results = run_ranks(_scatter_gather, 4, env=ENV, timeout=160)
    world = 4
    for rank, got in enumerate(results):
        for dtype in DTYPES:
            for shape in ((0,), (1,), (5,), (2, 3), (700,)):
                block = torch.Size(shape).numel()
                base = (torch.arange(world * block).reshape((world,) + shape) % 7 + 1)[rank]
                expected = {"sum": base * 10, "max": base * 4, "min": base,
                            "avg": base * 10 // 4 if not dtype.is_floating_point else base * 2.5,
                            "premul": base * 5}
                for name, want in expected.items():
                    if name == "premul" and not dtype.is_floating_point:
                        continue
                    out = got["rs", str(dtype), shape, name]
                    assert out.dtype == dtype and out.shape == shape
                    assert out.double().tolist() == want.double().tolist(), (rank, dtype, shape, name)
                rows = [(torch.arange(block).reshape(shape) % 5 + 10 * r) for r in range(world)]
                assert got["ag", str(dtype), shape].double().tolist() == torch.cat(rows).double().tolist()
    for rank, got in enumerate(results):
        assert got["solo"] == (True, True)
        summed, pieces, part, objects, picked = got["rooted"]
        assert summed == (10 if rank == 1 else None)
        assert pieces == ([[r, 7 * r] for r in range(world)] if rank == 2 else None)
        assert part == [10 * rank, 10 * rank + 1] and picked == f"to {rank}"
        assert objects == ([{"rank": r} for r in range(world)] if rank == 0 else None)


def _errors(rank, world):
    import time
    from datetime import timedelta

    import torch.distributed as dist

    import pyddl.torch  # noqa: F401

    dist.init_process_group("pyddl")
    # A failed collective leaves its group unusable (as Gloo's): the mismatch gets a group of its own.
    side = dist.new_group(backend="pyddl")
    out = {}
    try:
        dist.all_reduce(torch.ones(3 + (rank == 2)), group=side)  # rank 2 passes 4 elements
    except Exception as err:
        out["mismatch"] = f"{type(err).__name__}: {err}"
    try:
        dist.all_to_all([torch.ones(1) for _ in range(world)], [torch.ones(1) for _ in range(world)])
    except Exception as err:
        out["unsupported"] = f"{type(err).__name__}: {err}"
    try:
        dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.BAND)
    except Exception as err:
        out["band"] = f"{type(err).__name__}: {err}"
    if rank == 3:  # leaves the job without its next collective
        wait_for_ranks([0, 1, 2], 30)
        return out
    started = time.monotonic()
    work = dist.all_reduce(torch.ones(2), async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=1))
    except Exception as err:
        out["wait_timeout"] = (f"{type(err).__name__}: {err}", time.monotonic() - started)
    try:
        work.wait()
    except Exception as err:
        out["missing"] = f"{type(err).__name__}: {err}"
    out["waited_s"] = time.monotonic() - started
    return out


def test_mismatched_shapes_unsupported_ops_and_a_missing_rank_are_clear_errors():
    env = dict(ENV, PYDDL_TIMEOUT="4")
    results = run_ranks(_errors, 4, env=env, timeout=120)
    for rank, out in enumerate(results):
        assert "CollectiveMismatchError" in out["mismatch"] and "ranks 0,1,3: allreduce(float32[3]" in out["mismatch"]
        assert "ranks 2: allreduce(float32[4]" in out["mismatch"]
        assert "NotImplementedError" in out["unsupported"] and "all_to_all on tensor lists; use all_to_all_single" in out["unsupported"]
        assert "does not support ReduceOp" in out["band"] and "SUM, AVG" in out["band"]
        if rank != 3:
            # The first rank to time out leaves; the others may see its connection close first.
            assert "ranks that did not arrive: rank 3 " in out["missing"], out["missing"]
            text, waited = out["wait_timeout"]
            assert "did not complete within the 1 s given to Work.wait()" in text and waited < 3, out["wait_timeout"]
            assert out["waited_s"] < 30
    assert any("CollectiveTimeoutError" in out.get("missing", "") and "timed out after 4 s" in out["missing"]
               for out in results)


def _ddp_sparse(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    groups = _groups()
    out = {}
    for name, group in groups.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(12, 3, sparse=True), torch.nn.Linear(3, 1))
        ddp = DDP(model, process_group=group)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        for step in range(3):
            opt.zero_grad()
            rows = torch.tensor([(rank * 3 + step) % 12, 5, 5][: 1 + rank % 3])  # 1 to 3 rows, row 5 shared
            ddp(rows).sum().backward()
            opt.step()
        out[name] = (model[0].weight.grad.is_sparse, [p.detach().clone() for p in model.parameters()])
    dist.destroy_process_group()
    return out


def test_ddp_with_sparse_gradients_on_pyddl_equals_gloo():
    for rank, out in enumerate(run_ranks(_ddp_sparse, 4, env=ENV, timeout=160)):
        for name in ("native", "multiring"):
            assert out[name][0], f"rank {rank} {name}: the embedding's gradient is no longer sparse"
            for got, want in zip(out[name][1], out["gloo"][1]):
                torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank} on {name}")
