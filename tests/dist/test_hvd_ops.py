"""pyddl.torch's Horovod op grid: closed forms on 3 Gloo ranks (rank r contributes r+1),
gradients of the differentiable ops, state broadcast, objects, SyncBatchNorm, errors."""

import pytest
import torch
import torch.nn as nn

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]


def _ops(rank, world):
    import pyddl.torch as hvd

    hvd.init()
    s = world * (world + 1) // 2
    out = {"failures": []}
    fail = out["failures"].append
    for dtype in DTYPES:
        x = torch.full((5,), rank + 1, dtype=dtype)
        if not torch.all(hvd.allreduce(x, op=hvd.Sum) == s):
            fail(f"allreduce sum {dtype}")
        if not torch.all(hvd.allreduce(x, average=False) == s):
            fail(f"allreduce average=False {dtype}")
        if not torch.all(hvd.allreduce(torch.full((3,), 2 * rank, dtype=dtype)) == world - 1):
            fail(f"allreduce default average {dtype}")
        y = x.clone()
        if hvd.allreduce_(y, op=hvd.Max) is not y or not torch.all(y == world):
            fail(f"allreduce_ max {dtype}")
        h = hvd.allreduce_async(x, op=hvd.Min)
        if not torch.all(hvd.synchronize(h) == 1):
            fail(f"allreduce_async min {dtype}")
        z = x.clone()
        h = hvd.allreduce_async_(z, op=hvd.Sum, name=f"z.{dtype}")
        hvd.synchronize(h)
        if not torch.all(z == s):
            fail(f"allreduce_async_ {dtype}")
        g = hvd.allgather(torch.full((rank + 1, 2), rank, dtype=dtype))
        if g.tolist() != [[r, r] for r in range(world) for _ in range(r + 1)]:
            fail(f"allgather {dtype}")
        b = hvd.broadcast(torch.full((2,), rank, dtype=dtype), root_rank=1)
        if not torch.all(b == 1):
            fail(f"broadcast {dtype}")
    prod = hvd.allreduce(torch.tensor([rank + 1.0]), op=hvd.Product).item()
    scaled = hvd.allreduce(torch.tensor([rank + 1.0]), op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5).item()
    avg_scaled = hvd.allreduce(torch.tensor([rank + 1.0]), prescale_factor=3.0).item()
    grouped = hvd.grouped_allreduce([torch.full((2,), rank + 1.0), torch.full((3,), rank + 1, dtype=torch.int64)], op=hvd.Sum)
    ga = [torch.full((2,), rank + 1.0)]
    hvd.grouped_allreduce_(ga, op=hvd.Sum)
    gh = hvd.grouped_allreduce_async([torch.ones(2)], op=hvd.Sum)
    out["poll"] = isinstance(hvd.poll(gh), bool)
    out["grouped_async"] = hvd.synchronize(gh)[0].tolist()
    t = torch.zeros(3)
    hvd.broadcast_(t.add_(rank), root_rank=2)
    bh = hvd.broadcast_async_(torch.full((1,), float(rank)), root_rank=0)
    # alltoall: rank r sends r+1 rows to each rank j (values 10r+j).
    rows = torch.cat([torch.full((rank + 1, 2), 10 * rank + j) for j in range(world)])
    a2a, recv_splits = hvd.alltoall(rows, splits=[rank + 1] * world)
    rs = hvd.reducescatter(torch.arange(2 * world, dtype=torch.float32).reshape(-1, 1) * (rank + 1), op=hvd.Sum)
    rs_avg = hvd.reducescatter(torch.full((world, 2), 2.0 * rank))
    out.update(
        prod=prod, scaled=scaled, avg_scaled=avg_scaled, grouped=[v.tolist() for v in grouped], grouped_=ga[0].tolist(),
        broadcast_=t.tolist(), broadcast_async_=hvd.synchronize(bh).tolist(), a2a=a2a.tolist(), a2a_splits=recv_splits.tolist(),
        rs=rs.reshape(-1).tolist(), rs_avg=rs_avg.tolist(),
    )

    # Gradients of the differentiable ops (Horovod's definitions).
    w = torch.full((2,), float(rank + 1), requires_grad=True)
    (hvd.allreduce(w, op=hvd.Sum) * torch.tensor([1.0, 2.0])).sum().backward()
    out["grad_allreduce"] = w.grad.tolist()  # the sum over ranks of [1, 2]
    v = torch.full((rank + 1,), 1.0, requires_grad=True)
    gathered = hvd.allgather(v)
    (gathered * torch.arange(1.0, gathered.numel() + 1)).sum().backward()
    out["grad_allgather"] = v.grad.tolist()
    u = torch.full((2,), float(rank), requires_grad=True)
    (hvd.broadcast(u, root_rank=1) * 3).sum().backward()
    out["grad_broadcast"] = u.grad.tolist()

    # State: parameters, optimizer state and objects from the root.
    torch.manual_seed(rank)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * (rank + 1), momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["lr"] = opt.param_groups[0]["lr"]
    out["momentum_buf"] = opt.state[model.weight]["momentum_buffer"].clone()
    out["object"] = hvd.broadcast_object({"rank": rank, "name": "x" * rank}, root_rank=2)
    out["objects"] = hvd.allgather_object(("r", rank))

    # SyncBatchNorm over 3 ranks == BatchNorm over the concatenated batch.
    torch.manual_seed(0)
    full = torch.randn(3 * 4, 3, 5, 5)
    mine = full[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    sbn = hvd.SyncBatchNorm(3)
    torch.manual_seed(1)
    nn.init.uniform_(sbn.weight)
    (sbn(mine) * torch.arange(1.0, 5 * 5 * 3 * 4 + 1).reshape(4, 3, 5, 5)).sum().backward()
    out["sbn"] = (mine.grad.clone(), sbn.weight.grad.clone(), sbn.running_mean.clone(), sbn.running_var.clone())

    errors = []
    for call in (
        lambda: hvd.broadcast(torch.ones(1), root_rank=world),
        lambda: hvd.allreduce(torch.ones(1), op=hvd.Adasum),
        lambda: hvd.allreduce(torch.ones(1), op=hvd.Sum, average=True),
        lambda: hvd.alltoall(torch.ones(4, 1)),
    ):
        try:
            call()
            errors.append("no error")
        except (ValueError, NotImplementedError) as err:
            errors.append(str(err))
    h1 = hvd.allreduce_async(torch.ones(1), name="dup")
    try:
        hvd.allreduce_async(torch.ones(1), name="dup")
        errors.append("no error")
    except ValueError as err:
        errors.append(str(err))
    hvd.synchronize(h1)
    try:
        hvd.allreduce(torch.ones(2 + (rank == 0)))
        errors.append("no error")
    except hvd.HorovodInternalError as err:
        errors.append(str(err))
    out["errors"] = errors
    out["caps"] = (hvd.gloo_built(), hvd.gloo_enabled(), hvd.nccl_built(), hvd.mpi_enabled(), hvd.mpi_threads_supported())
    return out


def _reference_sbn():
    torch.manual_seed(0)
    full = torch.randn(3 * 4, 3, 5, 5).requires_grad_(True)
    bn = nn.BatchNorm2d(3)
    torch.manual_seed(1)
    nn.init.uniform_(bn.weight)
    weights = torch.arange(1.0, 5 * 5 * 3 * 4 + 1).reshape(4, 3, 5, 5).repeat(3, 1, 1, 1)
    (bn(full) * weights).sum().backward()
    return full.grad, bn.weight.grad, bn.running_mean, bn.running_var


def test_horovod_ops_on_three_ranks():
    world = 3
    results = run_ranks(_ops, world, timeout=170)
    ref_dx, ref_dw, ref_mean, ref_var = _reference_sbn()
    s = 6
    for rank, out in enumerate(results):
        assert out["failures"] == [], out["failures"]
        assert out["prod"] == 6.0 and out["scaled"] == s and out["avg_scaled"] == pytest.approx(6.0)
        assert out["grouped"] == [[6.0, 6.0], [6, 6, 6]] and out["grouped_"] == [6.0, 6.0]
        assert out["poll"] and out["grouped_async"] == [3.0, 3.0]
        assert out["broadcast_"] == [2.0, 2.0, 2.0] and out["broadcast_async_"] == [0.0]
        assert out["a2a_splits"] == [1, 2, 3]
        assert out["a2a"] == [[10 * j + rank] * 2 for j in range(world) for _ in range(j + 1)]
        mine = {0: [0, 1], 1: [2, 3], 2: [4, 5]}[rank]
        assert out["rs"] == [i * s for i in mine] and out["rs_avg"] == [[2.0, 2.0]]
        assert out["grad_allreduce"] == [3.0, 6.0]
        offsets = {0: 0, 1: 1, 2: 3}
        expect = [(offsets[rank] + k + 1) * 1.0 for k in range(rank + 1)]  # averaged over 3 equal grads
        assert out["grad_allgather"] == expect
        assert out["grad_broadcast"] == ([3.0, 3.0] if rank == 1 else [0.0, 0.0])
        assert out["lr"] == pytest.approx(0.1)
        for p, q in zip(out["params"], results[0]["params"]):
            assert torch.equal(p, q)
        assert torch.equal(out["momentum_buf"], results[0]["momentum_buf"])
        assert out["object"] == {"rank": 2, "name": "xx"}
        assert out["objects"] == [("r", r) for r in range(world)]
        dx, dw, mean, var = out["sbn"]
        assert torch.allclose(dx, ref_dx[rank * 4 : (rank + 1) * 4], atol=1e-4)
        assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(var, ref_var, atol=1e-5)
        errs = out["errors"]
        assert "root_rank 3 is out of range: this job has ranks 0..2" in errs[0]
        assert "does not implement Adasum" in errs[1]
        assert "either op= or the deprecated average=" in errs[2]
        assert "divisible by size" in errs[3]
        assert "'dup' is still in flight" in errs[4]
        assert "differs across ranks" in errs[5] and "float32[3]" in errs[5]
        assert out["caps"] == (True, True, False, False, False)
    # The weight gradient is a local sum: the ranks' sum equals BatchNorm's over the full batch.
    assert torch.allclose(sum(r["sbn"][1] for r in results), ref_dw, atol=1e-3)
