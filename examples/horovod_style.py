"""A training script in Horovod's usual shape: only the import line differs from Horovod.

    pyddl run -np 2 examples/horovod_style.py --epochs 3
    pyddl run -np 4 --topology 2x2 --allreduce multiring examples/horovod_style.py --fp16-allreduce
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data.distributed

import pyddl.torch as hvd  # was: import horovod.torch as hvd

parser = argparse.ArgumentParser(description="Horovod-style training on synthetic data")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--fp16-allreduce", action="store_true")
parser.add_argument("--seed", type=int, default=42)
args = parser.parse_args()

hvd.init()
torch.manual_seed(args.seed)
torch.set_num_threads(1)


def make_data(n, seed):
    # Ten Gaussian blobs in 20 dimensions: learnable, and the same on every rank.
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 20, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[labels] + torch.randn(n, 20, generator=g), labels)


train_dataset, test_dataset = make_data(4096, 1), make_data(1024, 2)
train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
test_sampler = torch.utils.data.distributed.DistributedSampler(test_dataset, num_replicas=hvd.size(), rank=hvd.rank())
test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=256, sampler=test_sampler)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


model = Net()
# Horovod's recipe: scale the learning rate by the number of workers.
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.5)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=compression, op=hvd.Average)


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()


for epoch in range(1, args.epochs + 1):
    model.train()
    train_sampler.set_epoch(epoch)
    total = 0.0
    for data, target in train_loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        total += loss.item()
    train_loss = metric_average(total / len(train_loader), "avg_loss")
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            correct += (model(data).argmax(1) == target).sum().item()
    accuracy = metric_average(correct / len(test_sampler), "avg_accuracy")
    if hvd.rank() == 0:
        print(f"epoch {epoch} train loss {train_loss:.4f} test accuracy {accuracy:.3f}", flush=True)
hvd.shutdown()
