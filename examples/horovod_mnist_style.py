"""A training script in Horovod's usual shape (its pytorch_mnist example): only the import line
differs from a Horovod script. The data are MNIST-shaped and synthetic, so it runs offline.

    pyddl run -np 2 examples/horovod_mnist_style.py --epochs 2
    pyddl run -np 4 --topology 2x2 --allreduce multiring examples/horovod_mnist_style.py --fp16-allreduce
    torchrun --nproc-per-node 2 examples/horovod_mnist_style.py

Rank 0 prints each epoch's average training loss (over all ranks), the throughput of the
whole job, and the test loss and accuracy.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed

import pyddl.torch as hvd  # was: import horovod.torch as hvd

parser = argparse.ArgumentParser(description="MNIST-style training with the Horovod API on pyddl")
parser.add_argument("--batch-size", type=int, default=32, help="per-worker training batch")
parser.add_argument("--test-batch-size", type=int, default=256)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.01, help="learning rate of one worker")
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--log-interval", type=int, default=20, help="batches between progress lines")
parser.add_argument("--fp16-allreduce", action="store_true", help="fp16 compression during allreduce")
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0,
                    help="divide gradients by this before the sum and by size/factor after")
parser.add_argument("--no-cuda", action="store_true", help="train on the CPU even with a GPU")
parser.add_argument("--train-samples", type=int, default=4096)
parser.add_argument("--test-samples", type=int, default=1024)


class SyntheticDigits(torch.utils.data.Dataset):
    """1x28x28 images of 10 classes: a smooth random pattern per class plus noise.

    A seed fixes the samples, so every rank builds the same dataset and the sampler shards it.
    """

    def __init__(self, samples: int, seed: int):
        coarse = torch.rand(10, 1, 7, 7, generator=torch.Generator().manual_seed(0))
        patterns = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (samples,), generator=g)
        self.images = 2 * patterns[self.labels] + 0.5 * torch.randn(samples, 1, 28, 28, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3)
        self.fc1 = nn.Linear(16 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 26 -> 13
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 11 -> 5
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def metric_average(value, name):
    # Horovod's idiom: average a Python number over all ranks.
    return hvd.allreduce(torch.tensor(value), name=name).item()


def train(epoch, model, optimizer, loader, sampler, args):
    model.train()
    # Horovod: set the epoch so each epoch shuffles differently but the same on every rank.
    sampler.set_epoch(epoch)
    total, start = 0.0, time.perf_counter()
    for batch_idx, (data, target) in enumerate(loader):
        if args.cuda:
            data, target = data.cuda(), target.cuda()
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        total += loss.item()
        if batch_idx % args.log_interval == 0 and hvd.rank() == 0:
            seen = batch_idx * len(data)
            print(f"Train Epoch: {epoch} [{seen}/{len(sampler)} ({100.0 * batch_idx / len(loader):.0f}%)]"
                  f"\tLoss: {loss.item():.6f}", flush=True)
    seconds = time.perf_counter() - start
    train_loss = metric_average(total / len(loader), "avg_train_loss")
    images_per_s = metric_average(len(sampler) / seconds, "images_per_s") * hvd.size()
    if hvd.rank() == 0:
        print(f"Epoch {epoch}: average train loss {train_loss:.4f}, {images_per_s:.0f} images/s "
              f"on {hvd.size()} workers", flush=True)


def test(model, loader, sampler, args):
    model.eval()
    test_loss, correct = 0.0, 0.0
    with torch.no_grad():
        for data, target in loader:
            if args.cuda:
                data, target = data.cuda(), target.cuda()
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    # Each rank saw its shard only: average the per-sample figures over the ranks.
    test_loss = metric_average(test_loss / len(sampler), "avg_loss")
    accuracy = metric_average(correct / len(sampler), "avg_accuracy")
    if hvd.rank() == 0:
        print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {100.0 * accuracy:.2f}%", flush=True)


def main():
    args = parser.parse_args()
    args.cuda = not args.no_cuda and torch.cuda.is_available()

    hvd.init()
    torch.manual_seed(args.seed)
    if args.cuda:
        # Horovod: pin one GPU per process, by its index on the server.
        torch.cuda.set_device(hvd.local_rank())
        torch.cuda.manual_seed(args.seed)
    # Horovod: limit each worker to one CPU thread, so workers on a server do not oversubscribe it.
    torch.set_num_threads(1)

    kwargs = {"num_workers": 1, "pin_memory": True} if args.cuda else {}
    train_dataset = SyntheticDigits(args.train_samples, seed=1)
    # Horovod: a DistributedSampler gives each rank its shard of the training data.
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.batch_size, sampler=train_sampler, **kwargs)
    test_dataset = SyntheticDigits(args.test_samples, seed=2)
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    test_loader = torch.utils.data.DataLoader(
        test_dataset, batch_size=args.test_batch_size, sampler=test_sampler, **kwargs)

    model = Net()
    if args.cuda:
        model.cuda()
    # Horovod: scale the learning rate by the number of workers (the global batch grew as much).
    lr_scaler = hvd.size()
    optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)
    if hvd.rank() == 0:
        print(f"{hvd.size()} workers x batch {args.batch_size}, lr {args.lr * lr_scaler:g}", flush=True)

    # Horovod: start every rank from rank 0's parameters and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    # Horovod: wrap the optimizer, so step() applies gradients averaged over all ranks.
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), compression=compression, op=hvd.Average,
        gradient_predivide_factor=args.gradient_predivide_factor)

    for epoch in range(1, args.epochs + 1):
        train(epoch, model, optimizer, train_loader, train_sampler, args)
        test(model, test_loader, test_sampler, args)
    hvd.shutdown()


if __name__ == "__main__":
    main()
