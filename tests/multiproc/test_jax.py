"""pyddl.jax on 2-4 Gloo ranks (rank r contributes r+1): every op's closed form on every dtype,
eager and inside jax.jit, pytrees with mixed dtypes and empty leaves; DistributedOptimizer's
equivalence with one worker on the global batch; and the errors (mismatched pytrees name the
first differing leaf and the ranks, a missing rank is named in a timeout)."""

import os

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from harness import run_ranks, wait_for_ranks  # noqa: E402

pytestmark = [pytest.mark.dist]

DTYPES = ["float32", "float16", "bfloat16", "int32"]


def _jax_env():
    # One thread per rank: the CI machine has 2 cores for every rank of a test.
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _closed_forms(rank, world):
    _jax_env()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pyddl.jax as hvd

    hvd.init(timeout_s=30)
    n, s = world, world * (world + 1) // 2
    errors = []
    servers = 2 if os.environ.get("PYDDL_TOPOLOGY") == "2x2" else 1
    if (hvd.size(), hvd.rank(), hvd.cross_size(), hvd.local_size()) != (n, rank, servers, n // servers):
        errors.append(f"rank queries: {hvd.size()}, {hvd.rank()}, {hvd.cross_size()}, {hvd.local_size()}")

    def expect(what, got, want_value, shape, dtype):
        if not isinstance(got, jax.Array):
            errors.append(f"{what}: got a {type(got).__name__}, want a jax.Array")
        elif got.dtype != jnp.dtype(dtype) or got.shape != shape:
            errors.append(f"{what}: got {got.dtype}{got.shape}, want {dtype}{shape}")
        elif not np.array_equal(np.asarray(got, np.float64), np.broadcast_to(np.asarray(want_value, np.float64), shape)):
            errors.append(f"{what}: got {np.asarray(got, np.float64).tolist()}, want {want_value}")

    jit_allreduce = jax.jit(hvd.allreduce, static_argnames=("op", "compression", "algorithm"))
    jit_broadcast = jax.jit(hvd.broadcast, static_argnames=("root_rank",))
    jit_reduce_scatter = jax.jit(hvd.reduce_scatter, static_argnames=("op",))
    for d in DTYPES:
        x = jnp.full((2, 3), rank + 1, d)
        floating = jnp.issubdtype(jnp.dtype(d), jnp.floating)
        avg = (n + 1) / 2 if floating else (n + 1) // 2  # an integer average floors
        for path, reduce in (("eager", hvd.allreduce), ("jit", jit_allreduce)):
            expect(f"{path} allreduce sum {d}", reduce(x, op=hvd.Sum), s, (2, 3), d)
            expect(f"{path} allreduce average (default) {d}", reduce(x), avg, (2, 3), d)
            expect(f"{path} allreduce min {d}", reduce(x, op=hvd.Min), 1, (2, 3), d)
            expect(f"{path} allreduce max {d}", reduce(x, op=hvd.Max), n, (2, 3), d)
            expect(f"{path} allreduce multiring {d}", reduce(x, op=hvd.Sum, algorithm="multiring"), s, (2, 3), d)
            expect(f"{path} allreduce native {d}", reduce(x, op=hvd.Sum, algorithm="native"), s, (2, 3), d)
        for codec in ("fp16", "bf16"):  # the wire carries x / n: multiples of n stay exact
            got = hvd.allreduce(x * n, op=hvd.Sum, compression=codec)
            expect(f"allreduce {codec} wire {d}", got, s * n, (2, 3), d)
        for path, bcast in (("eager", hvd.broadcast), ("jit", jit_broadcast)):
            expect(f"{path} broadcast {d}", bcast(jnp.full((4,), rank, d), root_rank=n - 1), n - 1, (4,), d)
        # allgather: rank r sends r+1 rows of value r.
        got = hvd.allgather(jnp.full((rank + 1, 2), rank, d))
        want = np.concatenate([np.full((r + 1, 2), r) for r in range(n)])
        expect(f"allgather (rows differ by rank) {d}", got, want, want.shape, d)
        # reduce_scatter of 2n+1 rows: the first rank gets one row more.
        rows = jnp.arange(2 * n + 1, dtype=d).reshape(-1, 1) * (rank + 1)
        mine = np.array_split(np.arange(2 * n + 1), n)[rank].reshape(-1, 1)
        for path, rs in (("eager", hvd.reduce_scatter), ("jit", jit_reduce_scatter)):
            expect(f"{path} reduce_scatter sum {d}", rs(rows, op=hvd.Sum), mine * s, mine.shape, d)
        expect(f"reduce_scatter max {d}", hvd.reduce_scatter(rows, op=hvd.Max), mine * n, mine.shape, d)

    # One pytree of mixed dtypes with empty leaves: every leaf back in its dtype and shape.
    tree = {
        "w": jnp.full((3, 2), rank + 1, "float32"),
        "b": [jnp.full((5,), rank + 1, "bfloat16"), jnp.zeros((0,), "int32"), jnp.full((2,), rank + 1, "int32")],
        "h": (jnp.full((0, 4), rank, "float16"), jnp.full((1,), rank + 1, "float16")),
        "n": rank + 1,  # a Python number becomes an int32 leaf
    }
    for path, reduce in (("eager", hvd.allreduce), ("jit", jit_allreduce)):
        out = reduce(tree, op=hvd.Sum)
        if jax.tree.structure(out) != jax.tree.structure(tree):
            errors.append(f"{path} pytree structure changed: {jax.tree.structure(out)}")
        for (p, got), ref in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(tree)):
            ref = jnp.asarray(ref)
            expect(f"{path} pytree leaf {jax.tree_util.keystr(p)}", got, s, ref.shape, ref.dtype)
    out = hvd.broadcast(tree, root_rank=0)
    for (p, got), ref in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(tree)):
        ref = jnp.asarray(ref)
        expect(f"broadcast pytree leaf {jax.tree_util.keystr(p)}", got, 1 if ref.size else 0, ref.shape, ref.dtype)
    gathered = hvd.allgather({"a": jnp.full((rank, 2), rank, "float32"), "i": jnp.full((1,), rank, "int32")})
    want = np.concatenate([np.full((r, 2), r) for r in range(n)])
    expect("allgather pytree (rank 0 sends no rows)", gathered["a"], want, want.shape, "float32")
    expect("allgather pytree int leaf", gathered["i"], np.arange(n), (n,), "int32")
    parts = hvd.reduce_scatter({"a": jnp.full((n, 2), rank + 1, "float32"), "b": jnp.full((1, 3), rank + 1, "int32")},
                               op=hvd.Sum)
    expect("reduce_scatter pytree a", parts["a"], s, (1, 2), "float32")
    expect("reduce_scatter pytree b", parts["b"], s, (1, 3) if rank == 0 else (0, 3), "int32")
    # Under jit, a collective on arrays closed over runs at every call, not once while traced.
    const = jnp.full((2,), rank + 1.0)
    if "io_callback" not in str(jax.make_jaxpr(lambda: hvd.allreduce(const))()):
        errors.append("an allreduce of a closed-over array ran at trace time instead of in the computation")
    step = jax.jit(lambda x: hvd.allreduce(const, op=hvd.Sum) + x)
    step(1.0)
    expect("jit allreduce of a closed-over array, 2nd call", step(2.0), s + 2, (2,), "float32")
    for what, fn in (("allgather", lambda: hvd.allgather(const)), ("barrier", hvd.barrier)):
        try:
            jax.jit(fn)()
            errors.append(f"{what} inside jit did not raise")
        except TypeError as err:
            if f"pyddl.jax.{what} cannot run inside jax.jit" not in str(err):
                errors.append(f"{what} inside jit: {err}")
    hvd.barrier()
    hvd.shutdown()
    return errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,env", [(3, {}), (4, {"PYDDL_TOPOLOGY": "2x2", "LOCAL_WORLD_SIZE": "2"})])
def test_every_op_closed_form_eager_and_in_jit(world, env):
    # 3 ranks: uneven splits; 4 as 2 servers x 2: the multiring's two levels. (2 ranks: below.)
    for rank, errors in enumerate(run_ranks(_closed_forms, world, env=env, timeout=260)):
        assert errors == [], f"rank {rank}: {errors}"


def _model_and_data():
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(0), 4)
    params = {"dense": {"w": jax.random.normal(k[0], (6, 4)) * 0.5, "b": jnp.zeros(4)},
              "out": {"w": jax.random.normal(k[1], (4, 3)) * 0.5, "b": jnp.zeros(3)}}
    x = jax.random.normal(k[2], (5, 8, 6))  # 5 steps x global batch 8
    y = jax.random.randint(k[3], (5, 8), 0, 3)

    def loss(p, xb, yb):
        h = jnp.tanh(xb @ p["dense"]["w"] + p["dense"]["b"])
        logits = h @ p["out"]["w"] + p["out"]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    return params, x, y, loss


def _train(rank, world):
    _jax_env()
    import jax
    import numpy as np
    import optax

    import pyddl.jax as hvd

    hvd.init(timeout_s=30)
    params, x, y, loss = _model_and_data()
    grad = jax.grad(loss)

    # One worker on the whole global batch: the reference.
    ref_tx = optax.sgd(0.1, momentum=0.9)
    ref, ref_state = params, ref_tx.init(params)
    for step in range(5):
        updates, ref_state = ref_tx.update(grad(ref, x[step], y[step]), ref_state, ref)
        ref = optax.apply_updates(ref, updates)

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    b = 8 // world  # this rank's share of each global batch
    sgd = optax.sgd(0.1, momentum=0.9)
    apply = jax.jit(lambda p, g, s: (lambda u, s: (optax.apply_updates(p, u), s))(*sgd.update(g, s, p)))
    results = {}
    for path, passes in (("jit", 1), ("eager", 1), ("jit", 2)):
        tx = hvd.DistributedOptimizer(optax.sgd(0.1, momentum=0.9), backward_passes_per_step=passes)
        p = hvd.broadcast_parameters(jax.tree.map(lambda v: v + rank, params))  # rank 0's survive
        state = hvd.broadcast_optimizer_state(tx.init(p))
        eager_state = sgd.init(p)

        @jax.jit
        def jit_step(p, state, xb, yb):
            updates, state = tx.update(grad(p, xb, yb), state, p)
            return optax.apply_updates(p, updates), state

        for step in range(5):
            xs, ys = x[step, rank * b:(rank + 1) * b], y[step, rank * b:(rank + 1) * b]
            m = b // passes  # micro-batches, accumulated
            for i in range(passes):
                xb, yb = xs[i * m:(i + 1) * m], ys[i * m:(i + 1) * m]
                if path == "jit":
                    p, state = jit_step(p, state, xb, yb)
                else:  # gradients averaged outside jit, by hand
                    p, eager_state = apply(p, hvd.allreduce_gradients(jax.jit(grad)(p, xb, yb)), eager_state)
        results[f"{path}, {passes} pass(es)"] = max_diff(p, ref), max_diff(p, params)
    hvd.shutdown()
    return results


@pytest.mark.timeout(180)
def test_two_workers_match_one_worker_on_the_global_batch():
    # 2 workers x batch 4 (or 2 accumulated micro-batches of 2) == 1 worker x batch 8, 5 steps of
    # SGD with momentum 0.9: inside jit, outside it, with accumulation. float32 sums in another
    # order: 1e-5 absolute on parameters of order 1.
    for rank, results in enumerate(run_ranks(_train, 2, timeout=150)):
        assert len(results) == 3
        for what, (diff, moved) in results.items():
            assert moved > 0.05, f"rank {rank}, {what}: the parameters barely moved ({moved}); the test proves nothing"
            assert diff < 1e-5, f"rank {rank}, {what}: differs from one worker by {diff}"


def _mismatch(rank, world):
    _jax_env()
    import jax.numpy as jnp

    import pyddl
    import pyddl.jax as hvd

    hvd.init(timeout_s=30)
    texts = []
    for kind in ("shape", "structure"):
        tree = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1, "int32")}
        if kind == "shape" and rank == 1:
            tree["b"] = jnp.ones(4)
        if kind == "structure" and rank == 2:
            tree = {"a": jnp.ones(2), "bb": jnp.ones(3), "c": jnp.ones(1, "int32")}
        try:
            hvd.allreduce(tree)
            texts.append("no error")
        except pyddl.CollectiveMismatchError as err:
            texts.append(str(err))
    return texts


@pytest.mark.timeout(120)
def test_mismatched_pytrees_name_the_first_differing_leaf_and_the_ranks():
    for shape, structure in run_ranks(_mismatch, 3, timeout=100):
        assert "pyddl.jax.allreduce: the pytrees differ across ranks, first at leaf #1" in shape
        assert "ranks 0,2: ['b']: float32[3]" in shape and "ranks 1: ['b']: float32[4]" in shape
        assert "first at leaf #1" in structure
        assert "ranks 0,1: ['b']: float32[3]" in structure and "ranks 2: ['bb']: float32[3]" in structure


def _missing(rank, world):
    _jax_env()
    import jax.numpy as jnp

    import pyddl
    import pyddl.jax as hvd

    hvd.init(timeout_s=3)
    hvd.allreduce({"w": jnp.ones(2)})
    if rank == 1:
        wait_for_ranks([0], 30)  # never reaches the second allreduce (rank 0 gives up after 3 s)
        return "slept"
    try:
        hvd.allreduce({"w": jnp.ones(2)})
    except pyddl.CollectiveTimeoutError as err:
        return str(err), err.missing_ranks
    return "no error"


@pytest.mark.timeout(120)
def test_a_missing_rank_times_out_naming_it():
    (text, missing), _ = run_ranks(_missing, 2, timeout=100)
    assert missing == (1,), text
    assert "timed out after 3 s" in text and "rank 1" in text
