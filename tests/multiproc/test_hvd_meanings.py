"""Horovod's meanings in pyddl.torch on 2 Gloo ranks: its dtypes (int16 too), integer scaling
and Average as Horovod computes them (in float64, truncated toward zero), also under join(),
DistributedOptimizer without named_parameters, broadcast_optimizer_state before any gradient,
the HOROVOD_* variables, the timeline calls, grouped allgather and reducescatter."""

import json
import os

import pytest
import torch
import torch.nn as nn

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]


def _meanings(rank, world, tmp):
    before_init = (os.environ.get("HOROVOD_RANK"), os.environ.get("HOROVOD_SIZE"))
    import pyddl
    import pyddl.torch as hvd

    before_init = (os.environ.get("HOROVOD_RANK"), os.environ.get("HOROVOD_SIZE"), before_init)
    hvd.init()
    out = {"env_before_init": before_init,
           "env": [os.environ[f"HOROVOD_{k}"] for k in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")]}
    # Every integer dtype Horovod's torch ops accept; rank r contributes r+1 (sum 3, Average 1.5).
    dtypes = {}
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        x = torch.full((3,), rank + 1, dtype=dtype)
        res = [hvd.allreduce(x, op=hvd.Sum), hvd.allreduce(x), hvd.allreduce(x, op=hvd.Min),
               hvd.allreduce(x, op=hvd.Max), hvd.allreduce(x, op=hvd.Product),
               hvd.allgather(x[: rank + 1]), hvd.broadcast(x, root_rank=1),
               hvd.alltoall(torch.arange(2, dtype=dtype) + 10 * rank),
               hvd.reducescatter(torch.arange(4, dtype=dtype).reshape(2, 2), op=hvd.Sum),
               hvd.grouped_allreduce([x, x[:1]], op=hvd.Sum)[1]]
        y = x.clone()
        hvd.allreduce_(y, op=hvd.Sum)
        z = x.clone()
        hvd.broadcast_(z, root_rank=0)
        res += [y, z]
        dtypes[str(dtype)] = ([t.dtype == dtype for t in res], [t.tolist() for t in res])
    out["dtypes"] = dtypes
    # Integer Average: Horovod sums and multiplies by 1/size in float64, truncating toward
    # zero: (-40 + -35) / 2 = -37.5 gives -37 (a floor would give -38).
    mine = torch.tensor([-40 if rank == 0 else -35, 3 + rank], dtype=torch.int32)
    out["int_average"] = hvd.allreduce(mine).tolist()  # [-37, 3] (7 / 2 = 3.5 -> 3)
    # prescale: each rank's [7, -7] * 0.5 = [3.5, -3.5] truncates to [3, -3], then the sum.
    seven = torch.tensor([7, -7], dtype=torch.int64)
    out["int_prescale"] = hvd.allreduce(seven, op=hvd.Sum, prescale_factor=0.5).tolist()  # [6, -6]
    # postscale: the sum [14, -14] * 0.3 = [4.2, -4.2] truncates to [4, -4].
    out["int_postscale"] = hvd.allreduce(seven, op=hvd.Sum, postscale_factor=0.3).tolist()
    # Average with a postscale: the sum times postscale / size, one truncation: -14 * 0.5 / 2.
    out["int_average_postscale"] = hvd.allreduce(seven, postscale_factor=0.5).tolist()  # [3, -3]
    # reducescatter Average: rank 0 gets row 0 (-75 / 2 -> -37), rank 1 row 1 (7 / 2 -> 3).
    out["int_reducescatter"] = hvd.reducescatter(mine.reshape(2, 1)).tolist()
    # A grouped Average mixing integers and floats: each as Horovod.
    ints, floats = hvd.grouped_allreduce([mine, torch.tensor([rank + 1.0])])
    out["grouped_mixed"] = (ints.tolist(), floats.tolist())
    # The same under join(): the joined rank contributes zeros and the divisor stays 2.
    if rank == 1:
        out["join"] = hvd.join()
    else:
        out["join_average"] = hvd.allreduce(torch.tensor([-75], dtype=torch.int64)).tolist()  # -37
        out["join"] = hvd.join()
    # Grouped allgather and reducescatter (Horovod returns lists).
    out["grouped_allgather"] = [t.tolist() for t in hvd.grouped_allgather(
        [torch.full((rank + 1,), rank), torch.full((1, 2), 5 * rank, dtype=torch.int16)])]
    out["grouped_reducescatter"] = [t.tolist() for t in hvd.grouped_reducescatter(
        [torch.ones(2, 1) * (rank + 1), torch.tensor([[-40 if rank == 0 else -35]] * 2)])]
    # Gradients of the grouped ops, as Horovod defines them per tensor: allgather's is the
    # average over ranks of the gathered rows' gradient (here rank+1: 1.5); reducescatter's
    # (Sum) gathers the blocks' gradients back (here rank r's block weighs r+1) times size 2.
    w = torch.ones(2, requires_grad=True)
    (hvd.grouped_allgather([w])[0] * (rank + 1)).sum().backward()
    v = torch.ones(2, 1, requires_grad=True)
    (hvd.grouped_reducescatter([v], op=hvd.Sum)[0] * (rank + 1)).sum().backward()
    out["grouped_grads"] = (w.grad.tolist(), v.grad.reshape(-1).tolist())
    # DistributedOptimizer without named_parameters (Horovod's test_optimizer_no_named_parameters):
    # two parameter groups, unique names equal on every rank, and a step with the average.
    p0, p1 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([{"params": [p0]}, {"params": [p1]}], lr=1.0))
    names = opt._parameter_names
    out["names"] = (sorted(names.values()), hvd.allgather_object(set(names.values())))
    ((p0.sum() + p1.sum()) * (rank + 1)).backward()
    opt.step()
    out["step"] = p0.tolist() + p1.tolist()  # - (1 + 2) / 2
    # broadcast_optimizer_state before any gradient (Horovod's test_broadcast_state_no_grad):
    # a frozen parameter keeps no gradient, a trained one gets zeros, so broadcast works on it.
    model = nn.Module()
    model.a = nn.Parameter(torch.tensor([1, 3], dtype=torch.int32), requires_grad=False)
    model.b = nn.Parameter(torch.rand(4))
    sgd = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, nesterov=True),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(sgd, root_rank=0)
    grad = sgd.param_groups[0]["params"][1].grad
    out["no_grad"] = (sgd.param_groups[0]["params"][0].grad is None, hvd.broadcast(grad, root_rank=0).tolist())
    # start_timeline / stop_timeline, twice with different files, as Horovod's test_timeline_api.
    events = []
    for i in range(2):
        path = os.path.join(tmp, f"timeline{i}.json")
        hvd.start_timeline(path, mark_cycles=True)
        hvd.allreduce(torch.tensor([1.0, 2.0, 3.0]), name="test_allreduce")
        hvd.stop_timeline()
        if rank == 0:
            with open(path) as fh:
                trace = json.load(fh)["traceEvents"]
            events.append(sorted({(e["name"], e["pid"]) for e in trace if e["name"] == "allreduce"}))
    out["timeline"] = events
    out["homogeneous"] = hvd.is_homogeneous()
    out["version"] = hvd.__version__ == pyddl.__version__
    try:
        hvd.PartialDistributedOptimizer(opt)
        out["partial"] = "no error"
    except NotImplementedError as err:
        out["partial"] = str(err)
    hvd.shutdown()
    return out


def test_horovod_meanings(tmp_path):
    results = run_ranks(_meanings, 2, str(tmp_path), timeout=140)
    for rank, out in enumerate(results):
        assert out["env_before_init"] == (str(rank), "2", (None, None))
        assert out["env"] == [str(rank), "2", str(rank), "2", "0", "1"]  # one server of 2 ranks
        for dtype, (kept, values) in out["dtypes"].items():
            assert all(kept), dtype
            assert values == [[3] * 3, [1] * 3, [1] * 3, [2] * 3, [2] * 3, [1, 2, 2], [2] * 3,
                              [0 + rank, 10 + rank], [[0, 2]] if rank == 0 else [[4, 6]], [3],
                              [3] * 3, [1] * 3], dtype
        assert out["int_average"] == [-37, 3]
        assert out["int_prescale"] == [6, -6]
        assert out["int_postscale"] == [4, -4]
        assert out["int_average_postscale"] == [3, -3]
        assert out["int_reducescatter"] == ([[-37]] if rank == 0 else [[3]])
        assert out["grouped_mixed"] == ([-37, 3], [1.5])
        assert out["join"] == 0
        assert out["grouped_allgather"] == [[0, 1, 1], [[0, 0], [5, 5]]]
        assert out["grouped_reducescatter"] == [[[1.5]], [[-37]]]  # one row of two each, Average
        assert out["grouped_grads"] == ([1.5, 1.5], [2.0, 4.0])
        assert out["names"] == (["allreduce.noname.0.0", "allreduce.noname.1.0"],
                                [{"allreduce.noname.0.0", "allreduce.noname.1.0"}] * 2)
        assert out["step"] == [-1.5, -1.5, -1.5]
        assert out["no_grad"] == (True, [0.0] * 4)
        assert out["homogeneous"] is True and out["version"] is True
        assert "hvd.DistributedOptimizer" in out["partial"]
    assert results[0]["join_average"] == [-37]
    assert results[0]["timeline"] == [[("allreduce", 0), ("allreduce", 1)]] * 2


def test_duplicate_parameter_names_are_refused_even_before_init():
    # Horovod's test_duplicate_names: a ValueError at construction, with no hvd.init() before it.
    import itertools

    import pyddl.torch as hvd

    net1, net2 = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(itertools.chain(net1.parameters(), net2.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="duplicate names: bias, weight"):
        hvd.DistributedOptimizer(opt, named_parameters=itertools.chain(net1.named_parameters(), net2.named_parameters()))
