"""pyddl.torch's Horovod op grid on 2, 3 and 4 Gloo ranks (rank r contributes r+1): closed forms
for every op and dtype, in place and async, scale factors, average=, names, process sets,
gradients of the differentiable ops, state and object broadcast, SyncBatchNorm, capabilities
and the errors Horovod raises. One spawned run per world size does all of it."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]


def _expect(fail, what, got, want):
    if not torch.equal(got, want):
        fail(f"{what}: got {got.tolist()}, want {want.tolist()}")


def _closed_forms(hvd, rank, n, fail):
    """Every op on every dtype against its closed form (exact: all values are small integers
    or halves, which every dtype holds exactly)."""
    s = n * (n + 1) // 2
    for dtype in DTYPES:
        d = str(dtype).replace("torch.", "")
        x = torch.full((5,), rank + 1, dtype=dtype)
        full = lambda v, shape=(5,): torch.full(shape, v, dtype=dtype)  # noqa: E731
        avg = (n + 1) / 2 if dtype.is_floating_point else (n + 1) // 2  # positive: truncation = floor
        _expect(fail, f"allreduce Sum {d}", hvd.allreduce(x, op=hvd.Sum), full(s))
        _expect(fail, f"allreduce default (Average) {d}", hvd.allreduce(x), full(avg))
        _expect(fail, f"allreduce Min {d}", hvd.allreduce(x, op=hvd.Min), full(1))
        _expect(fail, f"allreduce Max {d}", hvd.allreduce(x, op=hvd.Max), full(n))
        _expect(fail, f"allreduce Product {d}", hvd.allreduce(x, op=hvd.Product), full(math.factorial(n)))
        _expect(fail, f"input untouched {d}", x, full(rank + 1))
        y = x.clone()
        if hvd.allreduce_(y, op=hvd.Sum) is not y:
            fail(f"allreduce_ returns its input {d}")
        _expect(fail, f"allreduce_ {d}", y, full(s))
        h = hvd.allreduce_async(x, op=hvd.Max)
        x.fill_(-7)  # the async input is copied at the call
        if not isinstance(h, int) or not isinstance(hvd.poll(h), bool):
            fail(f"handles are ints and poll() a bool {d}")
        _expect(fail, f"allreduce_async {d}", hvd.synchronize(h), full(n))
        z = full(rank + 1)
        h = hvd.allreduce_async_(z, name=f"z.{d}", op=hvd.Sum)
        if hvd.synchronize(h) is not z:
            fail(f"allreduce_async_ returns its input {d}")
        _expect(fail, f"allreduce_async_ {d}", z, full(s))
        g = hvd.grouped_allreduce([full(rank + 1, (2,)), full(rank + 1, (3, 1))], op=hvd.Sum)
        _expect(fail, f"grouped_allreduce {d}", torch.cat([g[0], g[1].reshape(-1)]), full(s))
        gathered = hvd.allgather(torch.full((rank + 1, 2), rank, dtype=dtype))
        want = torch.cat([torch.full((r + 1, 2), r, dtype=dtype) for r in range(n)])
        _expect(fail, f"allgather (rows differ by rank) {d}", gathered, want)
        _expect(fail, f"allgather_async {d}", hvd.synchronize(hvd.allgather_async(full(rank, (1, 3)))),
                torch.cat([torch.full((1, 3), r, dtype=dtype) for r in range(n)]))
        _expect(fail, f"broadcast {d}", hvd.broadcast(full(rank, (2, 2)), root_rank=n - 1), full(n - 1, (2, 2)))
        b = full(rank, (3,))
        if hvd.broadcast_(b, root_rank=1) is not b:
            fail(f"broadcast_ returns its input {d}")
        _expect(fail, f"broadcast_ {d}", b, full(1, (3,)))
        _expect(fail, f"broadcast_async {d}", hvd.synchronize(hvd.broadcast_async(full(rank, (1,)), 0)), full(0, (1,)))
        # alltoall with splits: rank r sends j+1 rows of value 10r+j to rank j.
        rows = torch.cat([torch.full((j + 1, 2), 10 * rank + j, dtype=dtype) for j in range(n)])
        out, received = hvd.alltoall(rows, splits=[j + 1 for j in range(n)])
        _expect(fail, f"alltoall {d}", out, torch.cat([torch.full((rank + 1, 2), 10 * r + rank, dtype=dtype) for r in range(n)]))
        _expect(fail, f"alltoall received splits {d}", received, torch.full((n,), rank + 1, dtype=torch.int32))
        # reducescatter of 2n+1 rows: the first rank gets one row more.
        rows = torch.arange(2 * n + 1, dtype=dtype).reshape(-1, 1) * (rank + 1)
        mine = torch.tensor_split(torch.arange(2 * n + 1, dtype=dtype), n)[rank]
        _expect(fail, f"reducescatter Sum {d}", hvd.reducescatter(rows, op=hvd.Sum), mine.reshape(-1, 1) * s)
    return s


def _ops(rank, world):
    import pyddl.torch as hvd
    from pyddl.errors import CollectiveError, CollectiveMismatchError

    hvd.init()
    n = world
    out = {"failures": []}
    fail = out["failures"].append
    s = _closed_forms(hvd, rank, n, fail)
    one = torch.tensor([rank + 1.0])

    # Scale factors, the deprecated average= flag, async grouped forms, alltoall without splits.
    out["scaled"] = [
        hvd.allreduce(one, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25).item(),
        hvd.allreduce(one, prescale_factor=3.0).item(),
        hvd.allreduce_(one.clone(), op=hvd.Sum, postscale_factor=0.5).item(),
        hvd.synchronize(hvd.allreduce_async(one, op=hvd.Sum, prescale_factor=0.5)).item(),
        hvd.reducescatter(torch.ones(n, 1), op=hvd.Sum, prescale_factor=2.0, postscale_factor=3.0).item(),
        hvd.grouped_allreduce([one], op=hvd.Sum, prescale_factor=4.0)[0].item(),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["average_flag"] = [hvd.allreduce(one, average=False).item(), hvd.allreduce(one, average=True).item()]
    out["deprecation_warned"] = any(issubclass(w.category, DeprecationWarning) for w in caught)
    g_in = [torch.full((2,), rank + 1.0), torch.full((1,), rank + 1, dtype=torch.int64)]
    h = hvd.grouped_allreduce_async_(g_in, op=hvd.Sum)
    done = hvd.synchronize(h)
    out["grouped_async_"] = [type(done), all(a is b for a, b in zip(done, g_in)), [t.tolist() for t in g_in]]
    out["grouped_async"] = [t.tolist() for t in hvd.synchronize(hvd.grouped_allreduce_async([one, one * 2]))]
    out["grouped_"] = [t.tolist() for t in hvd.grouped_allreduce_([one.clone()], op=hvd.Max)]
    blocks = torch.cat([torch.full((2, 1), 100.0 * rank + j) for j in range(n)])
    plain = hvd.alltoall(blocks)
    out["alltoall_plain"] = plain.reshape(-1).tolist() if isinstance(plain, torch.Tensor) else "a tuple"
    a2a, recv = hvd.synchronize(hvd.alltoall_async(blocks, splits=torch.full((n,), 2, dtype=torch.int64)))
    out["alltoall_async"] = (a2a.reshape(-1).tolist(), recv.tolist(), recv.dtype)
    out["reducescatter_avg"] = hvd.synchronize(hvd.reducescatter_async(torch.full((n, 2), 2.0 * rank))).tolist()
    out["compressed"] = [hvd.allreduce(one, op=hvd.Sum, compression=c).item()
                         for c in (hvd.Compression.fp16, hvd.Compression.bf16)]
    out["empty"] = list(hvd.allreduce(torch.empty(0, 3)).shape)
    out["global_set"] = hvd.allreduce(one, op=hvd.Sum, process_set=hvd.global_process_set).item()
    out["all_ranks_set"] = hvd.allreduce(one, op=hvd.Sum, process_set=hvd.ProcessSet(range(n))).item()

    # Gradients, as Horovod defines them (see ops.py); loss weights make each rank's differ.
    w = torch.full((2,), rank + 1.0, requires_grad=True)
    (hvd.allreduce(w, op=hvd.Sum) * torch.tensor([1.0, 2.0]) * (rank + 1)).sum().backward()
    w2 = torch.full((2,), rank + 1.0, requires_grad=True)
    (hvd.allreduce(w2, prescale_factor=2.0) * (rank + 1)).sum().backward()
    ga, gb = torch.ones(2, requires_grad=True), torch.ones(1, 3, requires_grad=True)
    ra, rb = hvd.grouped_allreduce([ga, gb], op=hvd.Sum)
    (ra.sum() * (rank + 1) + rb.sum() * 2).backward()
    v = torch.ones(rank + 1, requires_grad=True)
    gathered = hvd.allgather(v)
    (gathered * torch.arange(1.0, gathered.numel() + 1) * (rank + 1)).sum().backward()
    u = torch.full((2,), float(rank), requires_grad=True)
    (hvd.broadcast(u, root_rank=1) * 3 * (rank + 1)).sum().backward()
    t = torch.ones(s, 2, requires_grad=True)
    sent, _ = hvd.alltoall(t, splits=[j + 1 for j in range(n)])
    (sent * (rank + 1)).sum().backward()
    q_sum, q_avg = torch.ones(2 * n, 1, requires_grad=True), torch.ones(2 * n, 1, requires_grad=True)
    (hvd.reducescatter(q_sum, op=hvd.Sum) * (rank + 1)).sum().backward()
    (hvd.reducescatter(q_avg) * (rank + 1)).sum().backward()
    out["grads"] = {
        "allreduce": w.grad.tolist(), "allreduce_scaled": w2.grad.tolist(), "grouped": [ga.grad.tolist(), gb.grad.tolist()],
        "allgather": v.grad.tolist(), "broadcast": u.grad.tolist(), "alltoall": t.grad[:, 0].tolist(),
        "reducescatter_sum": q_sum.grad.reshape(-1).tolist(), "reducescatter_avg": q_avg.grad.reshape(-1).tolist(),
    }

    # State from the root: parameters (state_dict, named list, generator) and optimizer state.
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()  # BatchNorm buffers differ by rank too
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(10 + rank)
    other = nn.Linear(3, 2)
    hvd.broadcast_parameters(list(other.named_parameters()), root_rank=n - 1)
    out["named"] = [p.detach().clone() for p in other.parameters()]
    hvd.broadcast_parameters(other.parameters(), root_rank=1)
    out["generator"] = [p.detach().clone() for p in other.parameters()]
    # Adam: only the root has stepped; SGD: everyone but the root has.
    adam = torch.optim.Adam(model.parameters(), lr=0.01 * (rank + 1), betas=(0.8 + 0.01 * rank, 0.999))
    if rank == 0:
        adam.step()
    hvd.broadcast_optimizer_state(adam, root_rank=0)
    sgd = torch.optim.SGD(other.parameters(), lr=0.1 * (rank + 1), momentum=0.9)
    if rank != n - 1:
        other(torch.ones(1, 3)).sum().backward()
        sgd.step()
    hvd.broadcast_optimizer_state(sgd, root_rank=n - 1)
    out["adam"] = (adam.param_groups[0]["lr"], adam.param_groups[0]["betas"],
                   {k: {kk: vv.clone() for kk, vv in st.items()} for k, st in adam.state_dict()["state"].items()})
    out["sgd"] = (sgd.param_groups[0]["lr"], len(sgd.state))
    out["object"] = hvd.broadcast_object({"rank": rank, "name": "x" * rank}, root_rank=n - 1)
    out["objects"] = hvd.allgather_object(("r", rank))

    # SyncBatchNorm over n ranks == BatchNorm over the concatenated batch.
    torch.manual_seed(0)
    batch = torch.randn(n * 4, 3, 5, 5)
    mine = batch[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    sbn = hvd.SyncBatchNorm(3)
    torch.manual_seed(1)
    nn.init.uniform_(sbn.weight)
    (sbn(mine) * torch.arange(1.0, 4 * 3 * 5 * 5 + 1).reshape(4, 3, 5, 5)).sum().backward()
    out["sbn"] = (mine.grad.clone(), sbn.weight.grad.clone(), sbn.bias.grad.clone(),
                  sbn.running_mean.clone(), sbn.running_var.clone())

    out["caps"] = (hvd.gloo_built(), hvd.gloo_enabled(), hvd.nccl_built(), hvd.mpi_built(), hvd.mpi_enabled(),
                   hvd.mpi_threads_supported(), hvd.cuda_built(), hvd.rocm_built(), hvd.ddl_built(), hvd.ccl_built())

    # Errors where Horovod raises them; none of these reaches the other ranks.
    errors = []
    for call in (
        lambda: hvd.broadcast(torch.ones(1), root_rank=n),
        lambda: hvd.broadcast_async_(torch.ones(1), root_rank=-1),
        lambda: hvd.broadcast_object(1, root_rank=n),
        lambda: hvd.broadcast(torch.ones(1), root_rank="0"),
        lambda: hvd.allreduce(torch.ones(1), op=hvd.Adasum),
        lambda: hvd.allreduce(torch.ones(1), op=hvd.Sum, average=True),
        lambda: hvd.allreduce(torch.ones(1), op=42),
        lambda: hvd.alltoall(torch.ones(n + 1, 1)),
        lambda: hvd.alltoall(torch.ones(n + 1, 1), splits=[1] * n),
        lambda: hvd.allreduce(torch.ones(1, dtype=torch.bool)),  # Horovod's torch ops take no bool
        lambda: hvd.allreduce(torch.ones(1), process_set=hvd.ProcessSet([0])),
        lambda: hvd.init(comm=[0]),
        lambda: hvd.grouped_allreduce([]),
    ):
        try:
            call()
            errors.append("no error")
        except (ValueError, TypeError, NotImplementedError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    hvd.init(comm=list(range(n)))  # the whole job: accepted
    h1 = hvd.allreduce_async(one, name="dup")
    hb = hvd.broadcast_async(one, 0, name="dup")  # another kind of op: Horovod prefixes names by op
    try:
        hvd.allreduce_async_(one.clone(), name="dup")
        errors.append("no error")
    except ValueError as err:
        errors.append(f"ValueError: {err}")
    out["dup"] = (hvd.synchronize(h1).item(), hvd.synchronize(hb).item(),
                  hvd.synchronize(hvd.allreduce_async(one, name="dup", op=hvd.Sum)).item())
    out["resync"] = hvd.synchronize(h1)  # Horovod: None for a handle already synchronized
    try:
        hvd.poll(h1)
        errors.append("no error")
    except ValueError as err:
        errors.append(f"ValueError: {err}")
    # Last: a mismatch across ranks fails the job's collectives for good.
    bad = torch.ones(2 + (rank == 0)) if n != 2 else torch.ones(2, dtype=torch.float64 if rank == 0 else torch.float32)
    try:
        hvd.allreduce(bad)
        errors.append("no error")
    except hvd.HorovodInternalError as err:
        errors.append(f"HorovodInternalError: {err}")
        out["mismatch_types"] = (isinstance(err, CollectiveError), isinstance(err, RuntimeError),
                                 isinstance(err.__cause__, CollectiveMismatchError))
    out["errors"] = errors
    hvd.shutdown()
    return out


def _reference_sbn(n):
    torch.manual_seed(0)
    batch = torch.randn(n * 4, 3, 5, 5).requires_grad_(True)
    bn = nn.BatchNorm2d(3)
    torch.manual_seed(1)
    nn.init.uniform_(bn.weight)
    weights = torch.arange(1.0, 4 * 3 * 5 * 5 + 1).reshape(4, 3, 5, 5).repeat(n, 1, 1, 1)
    (bn(batch) * weights).sum().backward()
    return batch.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


@pytest.mark.timeout(30)
def test_nccl_built_is_horovods_version_code(monkeypatch):
    """Horovod's nccl_built() is NCCL_VERSION_CODE, 0 without NCCL, and its alltoall tests skip
    when `nccl_built() < 2700`: a bool True would read as NCCL 0.0.1 there."""
    from pyddl.torch import capabilities

    monkeypatch.setattr(capabilities.dist, "is_nccl_available", lambda: True)
    for version, code in [((2, 7, 8), 2708), ((2, 8, 4), 2804), ((2, 9, 6), 20906), ((2, 30, 7), 23007)]:
        monkeypatch.setattr(torch.cuda.nccl, "version", lambda v=version: v)
        assert capabilities.nccl_built() == code
    monkeypatch.setattr(capabilities.dist, "is_nccl_available", lambda: False)
    assert capabilities.nccl_built() == 0


@pytest.mark.parametrize("world", [2, 3, 4])
def test_horovod_ops(world):
    n = world
    results = run_ranks(_ops, n, timeout=170)
    s = n * (n + 1) // 2
    ref_dx, ref_dw, ref_db, ref_mean, ref_var = _reference_sbn(n)
    for rank, out in enumerate(results):
        assert out["failures"] == [], out["failures"]
        assert out["scaled"] == pytest.approx([s / 2, 3 * (n + 1) / 2, s / 2, s / 2, 6 * n, 4 * s])
        assert out["average_flag"] == pytest.approx([s, (n + 1) / 2]) and out["deprecation_warned"]
        assert out["grouped_async_"] == [tuple, True, [[s, s], [s]]]
        assert out["grouped_async"] == [[(n + 1) / 2], [n + 1]]
        assert out["grouped_"] == [[n]]
        assert out["alltoall_plain"] == [100.0 * r + rank for r in range(n) for _ in range(2)]
        assert out["alltoall_async"] == (out["alltoall_plain"], [2] * n, torch.int64)
        assert out["reducescatter_avg"] == [[n - 1.0, n - 1.0]]
        # The fp16/bf16 wire carries x / n (so fp16 cannot overflow): a few roundings of 2^-9 at most.
        assert out["compressed"] == pytest.approx([s, s], rel=2**-7) and out["empty"] == [0, 3]
        assert out["global_set"] == s and out["all_ranks_set"] == s

        grads = out["grads"]
        assert grads["allreduce"] == [s, 2 * s]  # Sum of the ranks' [1, 2] * (r+1)
        assert grads["allreduce_scaled"] == pytest.approx([2 * s / n] * 2)  # Average, prescale 2
        assert grads["grouped"] == [[s, s], [[2 * n] * 3]]
        offset = rank * (rank + 1) // 2  # rows of the ranks before this one
        assert grads["allgather"] == pytest.approx([s / n * (offset + k + 1) for k in range(rank + 1)])
        assert grads["broadcast"] == pytest.approx([3 * s / n] * 2 if rank == 1 else [0.0, 0.0])
        assert grads["alltoall"] == [j + 1.0 for j in range(n) for _ in range(j + 1)]
        owner = [j for j in range(n) for _ in range(2)]  # reducescatter: 2 rows per rank
        assert grads["reducescatter_sum"] == [n * (j + 1.0) for j in owner]
        assert grads["reducescatter_avg"] == [j + 1.0 for j in owner]

        for key, value in out["state"].items():
            assert torch.equal(value, results[0]["state"][key]), key
        for p, q in zip(out["named"], results[n - 1]["named"]):
            assert torch.equal(p, q)
        for p, q in zip(out["generator"], results[1]["generator"]):
            assert torch.equal(p, q)
        lr, betas, state = out["adam"]
        assert lr == 0.01 and betas == (0.8, 0.999) and len(state) == 6
        for k, st in state.items():
            for name, value in st.items():
                assert torch.equal(value, results[0]["adam"][2][k][name]), (k, name)
        assert out["sgd"] == (pytest.approx(0.1 * n), 0)  # the root had not stepped: no state
        assert out["object"] == {"rank": n - 1, "name": "x" * (n - 1)}
        assert out["objects"] == [("r", r) for r in range(n)]

        dx, dw, db, mean, var = out["sbn"]
        assert torch.allclose(dx, ref_dx[rank * 4 : (rank + 1) * 4], atol=1e-4)
        assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(var, ref_var, atol=1e-5)
        caps = out["caps"]
        assert (*caps[:2], bool(caps[2]), *caps[3:]) == (
            dist.is_gloo_available(), True, dist.is_nccl_available(), dist.is_mpi_available(), False, False,
            torch.backends.cuda.is_built(), torch.version.hip is not None, False, False,
        )

        errs = out["errors"]
        assert errs[0] == f"ValueError: broadcast root_rank {n} is out of range: this job has ranks 0..{n - 1}"
        assert errs[1].startswith("ValueError: broadcast root_rank -1 is out of range")
        assert errs[2].startswith(f"ValueError: broadcast root_rank {n} is out of range")
        assert errs[3] == "TypeError: root_rank must be an integer rank, got str"
        assert errs[4].startswith("NotImplementedError: pyddl does not implement Adasum; use op=hvd.Average")
        assert "either op= or the deprecated average=" in errs[5]
        assert errs[6].startswith("ValueError: unknown reduction op 42")
        assert f"in {n} equal parts, but it has {n + 1} rows" in errs[7]
        assert errs[8].startswith(f"ValueError: alltoall splits {[1] * n} must be {n} non-negative row counts summing to axis 0 ({n + 1})")
        assert errs[9].startswith("TypeError: tensor has dtype torch.bool; pyddl collectives support")
        assert errs[10] == ("ValueError: ProcessSet(process_set_id=None, ranks=[0]) is not registered: call "
                            "hvd.add_process_set() with it on every rank first")
        assert f"init(comm=...) must span all {n} ranks" in errs[11]
        assert errs[12] == "ValueError: grouped_allreduce needs a non-empty list of tensors"
        assert errs[13].startswith("ValueError: allreduce 'dup' is still in flight")
        assert out["dup"] == pytest.approx(((n + 1) / 2, 1.0, s)) and out["resync"] is None
        assert "is unknown or already synchronized" in errs[14]
        assert errs[15].startswith("HorovodInternalError: pyddl: collective #") and "differs across ranks" in errs[15]
        if n == 2:
            assert "float64[2]" in errs[15] and "float32[2]" in errs[15]
        else:
            assert "float32[3]" in errs[15] and "float32[2]" in errs[15]
        assert out["mismatch_types"] == (True, True, True)
    # Weight and bias gradients are local sums: over the ranks they are BatchNorm's on the whole batch.
    assert torch.allclose(sum(r["sbn"][1] for r in results), ref_dw, atol=1e-3)
    assert torch.allclose(sum(r["sbn"][2] for r in results), ref_db, atol=1e-3)


def test_reduce_op_names_and_compressors():
    from pyddl.torch import Compression
    from pyddl.torch.ops import Adasum, Average, Max, Min, Product, Sum, reduce_op_name

    assert [reduce_op_name(op) for op in (None, Average, Sum, Min, Max, Product)] == [
        "average", "average", "sum", "min", "max", "product"]
    with pytest.warns(DeprecationWarning):
        assert reduce_op_name(average=False) == "sum" and reduce_op_name(average=0) == "sum"
    with pytest.raises(NotImplementedError, match="does not implement Adasum"):
        reduce_op_name(Adasum)
    assert [c.codec for c in (Compression.none, Compression.fp16, Compression.bf16)] == ["none", "fp16", "bf16"]
    x = torch.tensor([1.5, -2.25], dtype=torch.float64)
    for c, wire_dtype in ((Compression.none, torch.float64), (Compression.fp16, torch.float16), (Compression.bf16, torch.bfloat16)):
        wire, ctx = c.compress(x)
        assert wire.dtype == wire_dtype and torch.equal(c.decompress(wire, ctx), x)
    ints, ctx = Compression.fp16.compress(torch.tensor([3, 4]))
    assert ints.dtype == torch.int64 and Compression.fp16.decompress(ints, ctx).tolist() == [3, 4]
