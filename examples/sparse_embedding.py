"""A sparse embedding under hvd.DistributedOptimizer: its rows allgathered, or the table densified.

    pyddl run -np 2 examples/sparse_embedding.py

Each rank looks up a few hundred rows of a large `nn.Embedding(sparse=True)` per step. With
Horovod's default (`sparse_as_dense=False`) only those rows and their gradients cross the
wire; with `sparse_as_dense=True` the whole table does. Both settings train the same table
from the same rows, and the script checks that they end equal and prints each one's step time.
"""

import argparse
import statistics
import time

import torch

import pyddl.torch as hvd


def train(sparse_as_dense: bool, args) -> tuple[torch.Tensor, float]:
    """Train the table for `args.steps` steps; return it and the median step time (s)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(args.table_rows, args.dim, sparse=True)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(table.parameters(), lr=0.1),
                                   named_parameters=table.named_parameters(), sparse_as_dense=sparse_as_dense)
    rows = torch.Generator().manual_seed(hvd.rank())
    times = []
    for _ in range(args.steps):
        lookup = torch.randint(0, args.table_rows, (args.rows,), generator=rows)
        start = time.perf_counter()
        opt.zero_grad()
        table(lookup).pow(2).sum().backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return table.weight.detach(), statistics.median(times[1:])  # the first step sums densely either way


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256, help="rows each rank looks up per step")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    hvd.init()
    sparse_table, sparse_s = train(False, args)
    dense_table, dense_s = train(True, args)
    if hvd.rank() == 0:
        mb = args.table_rows * args.dim * 4 / 1e6
        print(f"{hvd.size()} workers, a {mb:.0f} MB table, {args.rows} rows per rank per step")
        print(f"rows allgathered (sparse_as_dense=False): {1e3 * sparse_s:7.1f} ms per step")
        print(f"table densified  (sparse_as_dense=True):  {1e3 * dense_s:7.1f} ms per step "
              f"({dense_s / sparse_s:.1f}x)")
        print(f"same table after {args.steps} steps: {torch.allclose(sparse_table, dense_table, atol=1e-6)}")
    hvd.shutdown()


if __name__ == "__main__":
    main()
