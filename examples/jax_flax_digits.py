"""Train a small Flax CNN on scikit-learn's digits, data-parallel with pyddl.jax.

    pyddl run -np 2 python examples/jax_flax_digits.py
    pyddl run -np 4 --topology 2x2 python examples/jax_flax_digits.py --compression bf16
    torchrun --nproc-per-node 2 examples/jax_flax_digits.py

The same data, split and sharding as `pyddl train`'s default run; the large-minibatch recipe
(linear scaling, warmup) as an optax schedule; the gradients averaged inside the jitted step
by DistributedOptimizer. Rank 0 prints each epoch's loss and the test top-1 (>= 0.95).
"""

import argparse
import os
import time

# One XLA thread per worker: the workers of one server share its cores.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import pyddl.jax as hvd  # noqa: E402
from pyddl.train.data import digits_split, shard_batches  # noqa: E402


class CNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, a 128-unit dense layer: about 150k weights."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32, help="per worker")
    ap.add_argument("--base-lr", type=float, default=0.05, help="learning rate at --base-batch")
    ap.add_argument("--base-batch", type=int, default=32)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--compression", choices=["none", "fp16", "bf16"], default="none")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    data = digits_split()
    x_train, y_train = (t.numpy() for t in data.train.tensors)
    x_test, y_test = (t.numpy() for t in data.test.tensors)
    x_train, x_test = x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    global_batch = args.batch_size * size
    recipe = hvd.Recipe(base_lr=args.base_lr, base_batch=args.base_batch, epochs=args.epochs,
                        train_size=len(x_train), global_batch=global_batch, warmup_epochs=args.warmup_epochs,
                        decay="cosine")

    model = CNN()
    params = model.init(jax.random.key(args.seed + rank), x_train[:1])["params"]
    params = hvd.broadcast_parameters(params, root_rank=0)  # every rank starts from rank 0's
    tx = hvd.DistributedOptimizer(optax.sgd(hvd.lr_schedule(recipe), momentum=0.9),
                                  compression=None if args.compression == "none" else args.compression)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)  # the allreduce runs in here
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def correct(params, x, y):
        return jnp.sum(jnp.argmax(model.apply({"params": params}, x), -1) == y)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        losses = []
        for idx in shard_batches(len(x_train), rank, size, global_batch, epoch, seed=args.seed):
            params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
            losses.append(loss)
        mean_loss = hvd.allreduce(jnp.mean(jnp.stack(losses)))  # averaged over ranks
        if rank == 0:
            print(f"epoch {epoch}: loss {float(mean_loss):.4f}", flush=True)

    mine = np.array_split(np.arange(len(x_test)), size)[rank]  # each rank scores its share
    hits = hvd.allreduce(jnp.array([correct(params, x_test[mine], y_test[mine]), len(mine)]), op=hvd.Sum)
    if rank == 0:
        print(f"trained a Flax CNN on digits for {args.epochs} epochs on {size} workers "
              f"(global batch {global_batch}) in {time.perf_counter() - start:.1f} s", flush=True)
        print(f"test top-1: {int(hits[0]) / int(hits[1]):.4f} ({int(hits[0])}/{int(hits[1])})", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
