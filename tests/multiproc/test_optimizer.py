"""DistributedOptimizer and the DDP hook, by equivalence: 4 workers x batch 8 for 5 SGD-momentum
steps end with the parameters of 1 worker x batch 32 (float32: 1e-5; fp16 wire: 2e-3; bf16
wire, 8 bits of mantissa: 2e-2)."""

import json
import os

import pytest
import torch
import torch.nn as nn

from harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

WORLD, LOCAL_BATCH, STEPS = 4, 8, 5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * LOCAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (WORLD * LOCAL_BATCH,), generator=g)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _reference(clip=None):
    model = _model()
    opt = _sgd(model)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _mine(step, rank):
    x, y = _data(step)
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[sl], y[sl]


def _train(rank, model, forward, opt):
    """STEPS steps of this rank's shard; return the model's parameters."""
    for step in range(STEPS):
        x, y = _mine(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train_variants(rank, world):
    import pyddl
    from pyddl.torch.ddp_hook import HookState, allreduce_hook, bf16_allreduce_hook, fp16_allreduce_hook
    from pyddl.torch.optimizer import DistributedOptimizer

    pyddl.init(topology="2x2", timeout_s=60)
    results = {}
    for alg in ("native", "multiring"):
        for comp in ("none", "fp16"):
            codec = type("C", (), {"codec": comp})()  # the core codec name, as Compression.* carry it
            model = _model()
            opt = DistributedOptimizer(_sgd(model), named_parameters=model.named_parameters(),
                                       compression=codec, algorithm=alg, bucket_bytes=600)
            results[("opt", alg, comp)] = _train(rank, model, model, opt)

            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
            ddp.register_comm_hook(HookState(algorithm=alg), fp16_allreduce_hook if comp == "fp16" else allreduce_hook)
            results[("ddp", alg, comp)] = _train(rank, model, ddp, _sgd(ddp))

    # Horovod's own options: the real Compression objects, auto (tuned when the optimizer is
    # built, in a job whose default is native), Sum with the learning rate divided by the
    # size, a pre-divide factor, a user's Compressor, and the bf16 DDP hook.
    from pyddl.torch import Compression, Sum

    class Float64Compressor:
        @staticmethod
        def compress(tensor):
            return tensor.double(), tensor.dtype

        @staticmethod
        def decompress(tensor, ctx):
            return tensor.to(ctx)

    variants = {
        "auto-fp16": dict(algorithm="auto", compression=Compression.fp16),
        "sum": dict(op=Sum, lr=0.1 / WORLD),
        "predivide": dict(gradient_predivide_factor=2.0),
        "user-compressor": dict(compression=Float64Compressor),
        "bf16": dict(compression=Compression.bf16),
    }
    for key, kw in variants.items():
        model = _model()
        sgd = torch.optim.SGD(model.parameters(), lr=kw.pop("lr", 0.1), momentum=0.9)
        opt = DistributedOptimizer(sgd, named_parameters=model.named_parameters(), bucket_bytes=600, **kw)
        results[key] = _train(rank, model, model, opt)
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    ddp.register_comm_hook(HookState(algorithm="multiring"), bf16_allreduce_hook)
    results["ddp-bf16"] = _train(rank, model, ddp, _sgd(ddp))

    # Gradient accumulation: two micro-batches of 4 per step, the loss halved as Horovod asks.
    model = _model()
    opt = DistributedOptimizer(_sgd(model), named_parameters=model.named_parameters(), backward_passes_per_step=2)
    for step in range(STEPS):
        x, y = _mine(step, rank)
        opt.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            (nn.functional.cross_entropy(model(x[half]), y[half]) / 2).backward()
        opt.step()
    results["accumulate"] = [p.detach().clone() for p in model.parameters()]

    # Clipping the global gradient: synchronize, clip, step inside skip_synchronize.
    model = _model()
    opt = DistributedOptimizer(_sgd(model), named_parameters=model.named_parameters())
    for step in range(STEPS):
        x, y = _mine(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        with opt.skip_synchronize():
            opt.step()
    results["clip"] = [p.detach().clone() for p in model.parameters()]

    # The cross-rank check dropped after the first steps, as docs/torch.md shows.
    model = _model()
    opt = DistributedOptimizer(_sgd(model), named_parameters=model.named_parameters(), bucket_bytes=600)
    for step in range(STEPS):
        if step == 2:
            pyddl.set_check(False)
        x, y = _mine(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pyddl.set_check(True)
    results["check-dropped"] = [p.detach().clone() for p in model.parameters()]
    pyddl.shutdown()
    return results


def test_equivalent_to_one_worker_with_the_global_batch():
    ref, ref_clip = _reference(), _reference(clip=0.05)
    for rank, results in enumerate(run_ranks(_train_variants, WORLD, timeout=230)):
        for key, params in results.items():
            expected = ref_clip if key == "clip" else ref
            tol = 2e-2 if "bf16" in key else 2e-3 if "fp16" in key else 1e-5
            for p, q in zip(params, expected):
                assert torch.allclose(p, q, atol=tol, rtol=tol), f"rank {rank} {key}: max diff {(p - q).abs().max()}"


class _TwoHeads(nn.Module):
    def __init__(self, wide=4):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, wide)
        self.head_a = nn.Linear(wide, 1)
        self.head_b = nn.Linear(wide, 1)

    def forward(self, x, use_b):
        h = self.body(x)
        return self.head_b(h) if use_b else self.head_a(h)


def _unused_and_misuse(rank, world):
    import pyddl
    from pyddl.torch.optimizer import DistributedOptimizer

    pyddl.init(timeout_s=30)
    out = {}
    model = _TwoHeads()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), named_parameters=model.named_parameters())
    for step in range(3):
        opt.zero_grad()
        # Rank 0 never uses head_b, rank 1 alternates: no hang, equal parameters everywhere.
        model(torch.ones(2, 3) * (rank + 1), use_b=(rank == 1 and step % 2 == 0)).sum().backward()
        opt.step()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["layout"] = opt._reducer.layout()
    model(torch.ones(1, 3), use_b=False).sum().backward()
    try:
        opt.zero_grad()
        out["zero_grad"] = "no error"
    except RuntimeError as err:
        out["zero_grad"] = str(err)
    opt.step()
    wrong = _TwoHeads(wide=5 if rank == 1 else 4)
    try:
        DistributedOptimizer(torch.optim.SGD(wrong.parameters(), lr=0.1), named_parameters=wrong.named_parameters())
        out["mismatch"] = "no error"
    except pyddl.CollectiveMismatchError as err:
        out["mismatch"] = str(err)
    pyddl.shutdown()
    return out


def test_unused_parameters_zero_grad_misuse_and_mismatched_models():
    a, b = run_ranks(_unused_and_misuse, 2, timeout=120)
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert a["layout"] == b["layout"]
    # head_b (used on rank 1 at steps 0 and 2) moved; its average gradient is half of rank 1's.
    assert not torch.equal(a["params"][4], _TwoHeads().head_b.weight.detach())
    for out in (a, b):
        assert "zero_grad() was called after loss.backward() but before optimizer.step()" in out["zero_grad"]
        assert "the model differs across ranks at parameter #0" in out["mismatch"]
        assert "rank 0 has 'body.weight' float32[4, 3], rank 1 has 'body.weight' float32[5, 3]" in out["mismatch"]


def _timeline_run(rank, world, path):
    import pyddl
    from pyddl.torch.optimizer import DistributedOptimizer

    pyddl.init(timeout_s=30)
    torch.manual_seed(0)
    # Wide layers, so backward takes long enough to see buckets reduced while it runs.
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), named_parameters=model.named_parameters(),
                               bucket_bytes=512 * 513 * 4)  # one layer per bucket
    x = torch.randn(256, 512)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    pyddl.shutdown()  # rank 0 merges every rank's file into `path`


def test_timeline_shows_each_ranks_backward_buckets_and_exposed_wait(tmp_path):
    import json

    path = tmp_path / "timeline.json"
    (tmp_path / "timeline.json.rank5").write_text('{"name": "from an earlier 8-rank job", "pid": 5}\n')
    run_ranks(_timeline_run, 2, str(path), env={"PYDDL_TIMELINE": str(path)}, timeout=120)
    events = json.loads(path.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1}  # the stale rank file is not merged
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank]
        spans = {}
        for e in mine:
            if e.get("ph") == "X":
                spans.setdefault(e["name"], []).append(e)
        assert len(spans["backward"]) == 3 and len(spans["optimizer step"]) == 3
        assert len(spans["wait for gradients"]) == 3
        # One bucket per layer in every step: the first step's (the first bucket closes at 1
        # MiB, which the last layer's bias and weight reach), then the order observed.
        assert len(spans["gradient_bucket"]) == 6 + 6 + 6
        assert sum(e["name"].startswith("bucket ") and e["name"].endswith(" ready") for e in mine) == 6 + 6 + 6
        # In the last step, the first bucket's allreduce began while backward was still running.
        backward = spans["backward"][-1]
        first_bucket = min((e for e in spans["gradient_bucket"] if e["ts"] >= backward["ts"]), key=lambda e: e["ts"])
        assert first_bucket["ts"] < backward["ts"] + backward["dur"]


class _MixedDtypes(nn.Module):
    """float32, float16, float32 parameters: the first bucket of a dtype is not a prefix."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float16))
        self.c = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return (self.a * x).sum() + (self.b.float() * x).sum() + (self.c * x).sum()


def _mixed_dtypes(rank, world):
    import pyddl
    from pyddl.torch.optimizer import DistributedOptimizer

    pyddl.init(timeout_s=30)
    model = _MixedDtypes()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), named_parameters=model.named_parameters())
    layouts = []
    for _ in range(2):  # the first step's layout, then the one rebuilt in ready order
        opt.zero_grad()
        model(torch.full((3,), float(rank + 1))).backward()
        opt.step()
        layouts.append(opt._reducer.layout())
    pyddl.shutdown()
    return [p.detach().float() for p in model.parameters()], layouts


def test_every_parameter_of_a_mixed_dtype_model_is_averaged():
    for params, layouts in run_ranks(_mixed_dtypes, 2, timeout=120):
        # Each step's gradient is the rank's x: averaged, (1 + 2) / 2 = 1.5; two steps at lr 1.
        for p in params:
            assert torch.equal(p, torch.full((3,), -3.0))
        for layout in layouts:
            assert sorted(name for bucket in layout for name in bucket) == ["a", "b", "c"]


class _SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.lin = nn.Linear(4, 1)

    def forward(self, rows):
        if rows is None:  # the embedding left out of this step
            return self.lin(torch.zeros(4)).sum()
        return self.lin(self.emb(rows)).sum()


def _sparse_rows(rank, step):
    if step == 2 and rank == 1:
        return None
    return torch.tensor([[0, 3, 3], [3, 7, 9]][rank])  # row 3 on both ranks, twice on rank 0


def _sparse_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5)


def _sparse_grads(rank, world, sparse_as_dense, optimizer, trace, predivide=1.0):
    import pyddl
    from pyddl.torch.optimizer import DistributedOptimizer

    os.environ["PYDDL_TIMELINE"] = trace
    pyddl.init(timeout_s=30)
    model = _SparseEmbedding()
    base = optimizer(model)
    opt = DistributedOptimizer(base, named_parameters=model.named_parameters(), sparse_as_dense=sparse_as_dense,
                               gradient_predivide_factor=predivide)
    # The first step's layout, then the rebuilt one; in the third step rank 1 does not use the
    # embedding at all.
    for step in range(3):
        opt.zero_grad()
        model(_sparse_rows(rank, step)).backward()
        opt.step()
    grad = model.emb.weight.grad
    pyddl.shutdown()
    return grad.is_sparse, grad.to_dense(), [p.detach().clone() for p in model.parameters()]


def _sparse_calls(trace) -> list[int]:
    """How many sparse allreduces each rank's timeline shows."""
    with open(trace) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [sum(e.get("name") == "sparse_allreduce" and e.get("pid") == r for e in events) for r in range(2)]


def _sparse_reference(optimizer):
    """One process, both ranks' rows: the mean of the two ranks' losses."""
    model = _SparseEmbedding()
    opt = optimizer(model)
    for step in range(3):
        opt.zero_grad()
        (sum(model(_sparse_rows(r, step)) for r in range(2)) / 2).backward()
        opt.step()
    return model.emb.weight.grad.to_dense(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("sparse_as_dense", [False, True])
def test_sparse_gradients_are_averaged_and_keep_their_layout(sparse_as_dense, tmp_path):
    want_grad, want_params = _sparse_reference(_sparse_sgd)
    trace = str(tmp_path / "trace.json")
    for is_sparse, grad, params in run_ranks(_sparse_grads, 2, sparse_as_dense, _sparse_sgd, trace, timeout=120):
        assert is_sparse  # as in Horovod, also after a dense reduction
        torch.testing.assert_close(grad, want_grad)
        for got, want in zip(params, want_params):
            torch.testing.assert_close(got, want)
    # The first step sums it dense with the rest; once rebuilt, its rows are allgathered.
    assert _sparse_calls(trace) == [0 if sparse_as_dense else 2] * 2


def _sparse_adam(model):
    # SparseAdam takes sparse gradients only, so it fails if they come back dense.
    return torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.1)


def test_sparse_adam_steps_on_the_averaged_sparse_gradient_also_predivided(tmp_path):
    want_grad, want_params = _sparse_reference(_sparse_adam)
    trace = str(tmp_path / "trace.json")
    # Horovod's gradient_predivide_factor: a quarter before the sum, times 2 after.
    for is_sparse, grad, params in run_ranks(_sparse_grads, 2, False, _sparse_adam, trace, 4.0, timeout=120):
        assert is_sparse
        torch.testing.assert_close(grad, want_grad)
        torch.testing.assert_close(params[0], want_params[0])
    # SparseAdam takes sparse gradients only: its rows are allgathered from the first step on,
    # never summed dense.
    assert _sparse_calls(trace) == [3, 3]


def _ddp_hooks_sparse(rank, world):
    import torch.distributed as dist

    import pyddl
    from pyddl.torch.ddp_hook import allreduce_hook, fp16_allreduce_hook

    dist.init_process_group("gloo")
    pyddl.init(timeout_s=30)
    params = {}
    for name, hook in (("gloo", None), ("pyddl", allreduce_hook), ("pyddl fp16", fp16_allreduce_hook)):
        model = _SparseEmbedding()
        ddp = nn.parallel.DistributedDataParallel(model)
        if hook is not None:
            ddp.register_comm_hook(None, hook)
        opt = _sparse_sgd(model)
        for step in range(2):
            opt.zero_grad()
            ddp(_sparse_rows(rank, step)).backward()
            opt.step()
        params[name] = (model.emb.weight.grad.is_sparse, [p.detach().clone() for p in model.parameters()])
    pyddl.shutdown()
    dist.destroy_process_group()
    return params


def test_ddp_hooks_average_sparse_gradients_as_ddp_on_gloo():
    # DDP hands a sparse gradient to the hook in a bucket of its own; the fp16 hooks leave it
    # uncompressed, as Horovod's sparse allreduce does.
    for params in run_ranks(_ddp_hooks_sparse, 2, timeout=120):
        for name, tol in (("pyddl", {}), ("pyddl fp16", {"rtol": 0, "atol": 2e-3})):  # the Linear's fp16 wire
            assert params[name][0]
            for got, want in zip(params[name][1], params["gloo"][1]):
                torch.testing.assert_close(got, want, **tol)
