"""A 4-worker tour of pyddl's core: each rank contributes rank+1, every algorithm agrees.

    pyddl run -np 4 --topology 2x2 examples/allreduce_demo.py
"""

import time

import torch

import pyddl

pyddl.init()
r, n = pyddl.rank(), pyddl.size()
expected = n * (n + 1) // 2
for algorithm in ("native", "multiring", "auto"):
    pyddl.allreduce_(torch.ones(4 * 1024 * 1024), algorithm=algorithm)  # warm-up (auto tunes here)
    x = torch.full((4 * 1024 * 1024,), float(r + 1))  # 16 MiB
    t0 = time.perf_counter()
    pyddl.allreduce_(x, algorithm=algorithm)
    ms = (time.perf_counter() - t0) * 1e3
    ok = bool(torch.all(x == expected))
    if r == 0:
        print(f"{algorithm:>9}: 16 MiB allreduce over {n} ranks ({pyddl.topology().spec}) in {ms:6.1f} ms, "
              f"every element == {expected}: {ok}")
grads = pyddl.allgather(torch.tensor([float(r)]))
if r == 0:
    print(f"allgather of ranks: {grads.tolist()}; local {pyddl.local_rank()}/{pyddl.local_size()}, "
          f"server {pyddl.cross_rank()}/{pyddl.cross_size()}")
pyddl.shutdown()
