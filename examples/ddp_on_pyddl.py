"""A DDP training script in the usual torchrun shape. Its one change for pyddl is the backend
string ("gloo" before): pyddl registers backend "pyddl" with torch, so not even an import is
needed once pyddl is installed.

    torchrun --nproc-per-node 2 examples/ddp_on_pyddl.py
    pyddl run -np 4 --topology 2x2 --allreduce multiring examples/ddp_on_pyddl.py
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    dist.init_process_group("pyddl")  # was "gloo"
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

    # A regression problem; each rank trains on its own shard of it.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    x, y = x[rank::world], y[rank::world]

    for epoch in range(10):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            opt.step()
        with torch.no_grad():
            total = torch.nn.functional.mse_loss(ddp(x), y).reshape(1)
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {total.item():.6f} on {world} ranks ({dist.get_backend()})", flush=True)
    if rank == 0:
        print(f"weights checksum {sum(p.double().sum().item() for p in model.parameters()):.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
