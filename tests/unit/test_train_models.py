"""Models by name, the recipe's zero-init, their errors, and the default run's accuracy."""

import sys

import pytest
import torch
from torch import nn

from pyddl.train.config import TrainConfig
from pyddl.train.data import ShardSampler, load_data
from pyddl.train.models import SMALL_CNN, SmallCNN, available_models, build_model
from pyddl.train.optim import build_optimizer, make_criterion, set_lr
from pyddl.train.report import topk_correct


def test_small_cnn_shapes():
    model = build_model(SMALL_CNN, 10, (1, 8, 8))
    assert isinstance(model, SmallCNN)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert build_model(SMALL_CNN, 4, (3, 32, 32))(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="SmallCNN needs positive"):
        SmallCNN(width=0)


@pytest.mark.parametrize("name, block, last_bn", [("resnet18", "BasicBlock", "bn2"),
                                                  ("resnet50", "Bottleneck", "bn3")])
def test_resnets_zero_init_last_bn_gamma(name, block, last_bn):
    model = build_model(name, 10)
    blocks = [m for m in model.modules() if type(m).__name__ == block]
    assert blocks
    for b in blocks:
        assert torch.count_nonzero(getattr(b, last_bn).weight) == 0
        assert torch.count_nonzero(b.bn1.weight) > 0
    assert model.fc.out_features == 10


def test_model_without_zero_init_option_still_builds():
    model = build_model("mobilenet_v3_small", 5)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_auxiliary_heads_are_off():
    model = build_model("googlenet", 3).train()
    out = model(torch.zeros(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet05'; did you mean .*resnet50"):
        build_model("resnet05", 10)
    with pytest.raises(ValueError, match="unknown model 'zzz'; try small_cnn"):
        build_model("zzz", 10)
    assert {"small_cnn", "resnet50", "resnet101"} <= set(available_models())


def test_torchvision_model_needs_rgb():
    with pytest.raises(ValueError, match="takes 3-channel images, the data has 1.*small_cnn"):
        build_model("resnet18", 10, (1, 8, 8))


def test_missing_torchvision_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        build_model("resnet50", 10)
    assert available_models() == [SMALL_CNN]
    assert isinstance(build_model(SMALL_CNN, 10, (1, 8, 8)), nn.Module)


def _train_default(seed: int) -> float:
    """Train TrainConfig()'s model, data and recipe in one process at its global batch."""
    cfg = TrainConfig(seed=seed)
    torch.manual_seed(seed)
    data = load_data(cfg.data)
    recipe = cfg.make_recipe(len(data.train))
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    opt = build_optimizer(cfg.optimizer, model, 0.0, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loss_fn = make_criterion(cfg.label_smoothing)
    # One rank at the 2-worker global batch sees exactly the 2 workers' union of batches.
    sampler = ShardSampler(len(data.train), 0, 1, recipe.global_batch_at(0), seed=seed)
    x, y = data.train.tensors
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for step, idx in enumerate(sampler):
            set_lr(opt, recipe.at(epoch, step)[0])
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        top1, = topk_correct(model(data.test.tensors[0]), data.test.tensors[1], (1,))
    return top1 / len(data.test)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_recipe_reaches_095_at_the_2_worker_global_batch(capsys):
    cfg = TrainConfig()
    assert (cfg.workers, cfg.global_batch_at(0)) == (2, 64)
    accs = [_train_default(seed) for seed in (0, 1, 2)]
    with capsys.disabled():
        print(f"\ndefault recipe, 1 process, global batch 64, {cfg.epochs} epochs: test top-1 "
              f"{', '.join(f'{a:.4f}' for a in accs)}")
    assert min(accs) > 0.95
