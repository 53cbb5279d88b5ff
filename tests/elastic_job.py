"""A tiny deterministic Horovod-elastic training job for tests/root/test_elastic.py.

    pyddl run --nnodes 2:3 --master-addr A --max-restarts 2 -np 1 elastic_job.py OUT [--start FILE]

It reports (as `REPORT {json}` lines) every commit with the parameters it committed, what it
resumed from, and its final parameters; rank 0 saves the state it resumed from in OUT, so
that a plain 2-worker run (`--start`) can continue from exactly there.
"""

import json
import os
import sys
import time

import torch

import pyddl.torch as hvd

EPOCHS, BATCH, SAMPLES, COMMIT_EVERY, BASE_LR = 3, 2, 48, 2, 0.02


def report(**fields):
    print("REPORT " + json.dumps(fields), flush=True)


def weights(model):
    return [x for p in model.parameters() for x in p.detach().reshape(-1).tolist()]


out = sys.argv[1]
hvd.init()
torch.manual_seed(hvd.rank())  # a different start on every rank: the sync must fix it
x = torch.linspace(-1, 1, SAMPLES * 3, dtype=torch.float64).reshape(SAMPLES, 3)
y = x @ torch.tensor([[1.5], [-2.0], [0.5]], dtype=torch.float64) + 0.25
model = torch.nn.Linear(3, 1).double()
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=BASE_LR * hvd.size(), momentum=0.9),
                                     named_parameters=model.named_parameters())
sampler = hvd.elastic.ElasticSampler(range(SAMPLES), shuffle=True, seed=7)
epoch, batch = 0, 0
if "--start" in sys.argv:
    start = torch.load(sys.argv[sys.argv.index("--start") + 1], weights_only=False)
    model.load_state_dict(start["model"])
    optimizer.load_state_dict(start["optimizer"])
    sampler.load_state_dict(start["sampler"])
    epoch, batch = start["epoch"], start["batch"]
state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=epoch, batch=batch)


def rescale():
    for group in optimizer.param_groups:
        group["lr"] = BASE_LR * hvd.size()


state.register_reset_callbacks([rescale])


@hvd.elastic.run
def train(state):
    report(rank=hvd.rank(), size=hvd.size(), resumed=state.commits, w=weights(model), epoch=state.epoch,
           processed=sampler.processed_num)
    if state.commits and hvd.rank() == 0:
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), sampler=sampler.state_dict(),
                        epoch=state.epoch, batch=state.batch), os.path.join(out, f"resumed-{hvd.size()}.pt"))
    while state.epoch < EPOCHS:
        indices = list(sampler)
        for i in range(0, len(indices), BATCH):
            rows = indices[i:i + BATCH]
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            optimizer.step()
            sampler.record_batch(i // BATCH, BATCH)
            state.batch += 1
            if state.batch % COMMIT_EVERY == 0:
                state.commit()
                report(rank=hvd.rank(), size=hvd.size(), commit=state.commits, w=weights(model))
            time.sleep(float(os.environ.get("STEP_SLEEP_S", "0")))
        state.epoch += 1
        state.batch = 0
        sampler.set_epoch(state.epoch)
        state.commit()
        report(rank=hvd.rank(), size=hvd.size(), commit=state.commits, w=weights(model))


train(state)
report(rank=hvd.rank(), size=hvd.size(), final=weights(model))
