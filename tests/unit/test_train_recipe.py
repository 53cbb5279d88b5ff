"""The large-minibatch recipe against hand-computed values (Goyal et al. 2017; You et al. 2017)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyddl.train.optim import LARS, build_optimizer, make_criterion, set_lr, split_param_groups
from pyddl.train.recipe import (
    Recipe, cosine_decay_factor, parse_batch_ramp, ramp_batch_at, scaled_lr, step_decay_factor,
    steps_per_epoch, warmup_lr,
)

IMAGENET = 1_281_167


def goyal(**kw):
    args = dict(base_lr=0.1, base_batch=256, epochs=90, train_size=IMAGENET, global_batch=8192,
                warmup_epochs=5, decay="step", milestones=(30, 60, 80))
    args.update(kw)
    return Recipe(**args)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 8192) == pytest.approx(3.2)
    assert scaled_lr(0.1, 32, base_batch=32) == pytest.approx(0.1)
    assert scaled_lr(0.4, 64) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="batches must be positive"):
        scaled_lr(0.1, 0)
    with pytest.raises(ValueError, match="base_lr must be >= 0"):
        scaled_lr(-0.1, 256)


def test_warmup_lr_interpolates_then_holds():
    assert warmup_lr(0, 5, 0.1, 3.2) == pytest.approx(0.1)
    assert warmup_lr(2.5, 5, 0.1, 3.2) == pytest.approx(1.65)
    assert warmup_lr(5, 5, 0.1, 3.2) == pytest.approx(3.2)
    assert warmup_lr(7, 5, 0.1, 3.2) == pytest.approx(3.2)
    assert warmup_lr(0, 0, 0.1, 3.2) == pytest.approx(3.2)


def test_decay_factors():
    assert step_decay_factor(29, (30, 60, 80), 0.1) == 1.0
    assert step_decay_factor(30, (30, 60, 80), 0.1) == pytest.approx(0.1)
    assert step_decay_factor(85, (30, 60, 80), 0.1) == pytest.approx(1e-3)
    assert cosine_decay_factor(0) == 1.0
    assert cosine_decay_factor(0.5) == pytest.approx(0.5)
    assert cosine_decay_factor(1) == pytest.approx(0.0)
    assert cosine_decay_factor(1.5) == pytest.approx(0.0)
    assert cosine_decay_factor(-1) == 1.0


def test_steps_per_epoch():
    assert steps_per_epoch(IMAGENET, 8192) == 156
    assert steps_per_epoch(IMAGENET, 8192, drop_last=False) == 157
    assert steps_per_epoch(1437, 64) == 22


def test_goyal_schedule_hand_values():
    r = goyal()
    spe = IMAGENET // 8192
    assert r.steps_in_epoch(0) == spe
    assert r.at(0, 0) == (pytest.approx(0.1), 8192)
    # Half-way through the warmup (epoch 2.5): 0.1 + (3.2 - 0.1) / 2.
    assert r.at(2, spe // 2)[0] == pytest.approx(0.1 + 3.1 * (2 + (spe // 2) / spe) / 5)
    assert r.at(5, 0)[0] == pytest.approx(3.2)
    assert r.at(29, spe - 1)[0] == pytest.approx(3.2)
    assert r.at(30, 0)[0] == pytest.approx(0.32)
    assert r.at(60, 0)[0] == pytest.approx(0.032)
    assert r.at(89, spe - 1)[0] == pytest.approx(0.0032)
    assert r.total_steps() == 90 * spe


def test_warmup_adds_a_constant_increment_per_iteration():
    r = goyal(train_size=256 * 10, global_batch=1024, epochs=10, warmup_epochs=3, decay="none",
              milestones=())
    lrs = [r.at(e, s)[0] for e in range(3) for s in range(r.steps_in_epoch(e))]
    assert r.steps_in_epoch(0) == 2
    diffs = [b - a for a, b in zip(lrs, lrs[1:])]
    expected = (0.4 - 0.1) / (3 * 2)
    assert diffs == pytest.approx([expected] * len(diffs))
    assert r.at(3, 0)[0] == pytest.approx(0.4)


def test_batch_below_base_has_no_warmup():
    r = Recipe(base_lr=0.1, base_batch=256, epochs=5, train_size=1437, global_batch=64,
               warmup_epochs=2)
    assert [r.at(e, s)[0] for e in range(5) for s in (0, 10)] == pytest.approx([0.025] * 10)


def test_cosine_after_warmup():
    r = Recipe(base_lr=0.1, base_batch=256, epochs=10, train_size=5120, global_batch=512,
               warmup_epochs=2, decay="cosine")
    assert r.at(0, 0)[0] == pytest.approx(0.1)
    assert r.at(2, 0)[0] == pytest.approx(0.2)
    assert r.at(6, 0)[0] == pytest.approx(0.1)          # progress (6 - 2) / 8 = 0.5
    assert r.at(9, 5)[0] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 7.5 / 8)))


def test_batch_ramp_parse_and_lookup():
    ramp = parse_batch_ramp("0:256, 5:1024,10:4096")
    assert ramp == ((0, 256), (5, 1024), (10, 4096))
    assert [ramp_batch_at(ramp, e) for e in (0, 4, 5, 9, 10, 50)] == [256, 256, 1024, 1024, 4096, 4096]
    assert parse_batch_ramp("") == ()


@pytest.mark.parametrize("spec, message", [
    ("0-256", "is not EPOCH:GLOBAL_BATCH"),
    ("0:x", "is not EPOCH:GLOBAL_BATCH"),
    ("1:256", "must start at epoch 0"),
    ("0:256,5:512,5:1024", "must strictly increase"),
    ("0:256,3:0", "must be >= 1"),
])
def test_batch_ramp_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_batch_ramp(spec)


def test_ramp_drives_lr_and_steps():
    r = Recipe(base_lr=0.1, base_batch=256, epochs=12, train_size=100_000,
               batch_ramp=parse_batch_ramp("0:256,5:1024,10:4096"))
    assert r.at(0, 0) == (pytest.approx(0.1), 256)
    assert r.at(5, 0) == (pytest.approx(0.4), 1024)
    assert r.at(11, 3) == (pytest.approx(1.6), 4096)
    assert [r.steps_in_epoch(e) for e in (0, 5, 10)] == [390, 97, 24]
    assert r.total_steps() == 5 * 390 + 5 * 97 + 2 * 24


def test_ramp_during_warmup_targets_the_current_batch():
    r = Recipe(base_lr=0.1, base_batch=256, epochs=8, train_size=10_240,
               batch_ramp=((0, 256), (2, 512)), warmup_epochs=4)
    assert r.at(1, 0)[0] == pytest.approx(0.1 + (0.1 - 0.1) * 1 / 4)
    assert r.at(2, 0)[0] == pytest.approx(0.1 + (0.2 - 0.1) * 2 / 4)
    assert r.at(4, 0)[0] == pytest.approx(0.2)


def test_max_steps_per_epoch_caps_the_clock():
    r = goyal(max_steps_per_epoch=3)
    assert r.steps_in_epoch(0) == 3
    assert r.at(2, 1)[0] == pytest.approx(0.1 + 3.1 * (2 + 1 / 3) / 5)


@pytest.mark.parametrize("kw, message", [
    (dict(global_batch=0), "exactly one of global_batch"),
    (dict(batch_ramp=((0, 256),)), "exactly one of global_batch"),
    (dict(warmup_epochs=91), "warmup_epochs must be in"),
    (dict(decay="linear"), "decay must be one of"),
    (dict(milestones=()), "step decay needs milestones"),
    (dict(train_size=4096), "larger than the 4096 training samples"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(max_steps_per_epoch=0), "max_steps_per_epoch must be >= 1"),
])
def test_recipe_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        goyal(**kw)


def test_at_outside_the_run():
    r = goyal()
    with pytest.raises(ValueError, match="epoch 90 is outside"):
        r.at(90, 0)
    with pytest.raises(ValueError, match="step 156 is outside"):
        r.at(0, 156)


def test_label_smoothing_matches_hand_formula():
    torch.manual_seed(0)
    logits, targets, eps = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.1
    logp = logits.log_softmax(dim=1)
    nll = -logp[torch.arange(6), targets]
    hand = ((1 - eps) * nll + eps * (-logp).mean(dim=1)).mean()
    assert make_criterion(eps)(logits, targets).item() == pytest.approx(hand.item(), rel=1e-6)
    assert make_criterion(0.0)(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item())
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        make_criterion(1.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.ln = nn.LayerNorm(2)
        self.fc = nn.Linear(2, 3)
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied2 = nn.Linear(3, 3, bias=False)
        self.tied2.weight = self.tied.weight
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_split_param_groups_no_decay_on_norm_and_bias():
    net = _Net()
    decay, no_decay = split_param_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and decay["lars_adapt"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_adapt"] is False
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == ids([net.conv.weight, net.fc.weight, net.tied.weight])
    assert ids(no_decay["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias,
                                           net.ln.weight, net.ln.bias, net.fc.bias])
    assert len(decay["params"]) + len(no_decay["params"]) == 9   # each trainable tensor once
    assert split_param_groups(nn.Linear(2, 2, bias=False), 0.1)[0]["params"][0].shape == (2, 2)
    assert len(split_param_groups(nn.Linear(2, 2, bias=False), 0.1)) == 1


def _lars_param(w, g):
    p = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    return p


def test_lars_two_steps_against_hand_computation():
    eta, wd, lr, m = 0.01, 0.1, 1.0, 0.9
    p = _lars_param([3.0, 4.0], [0.3, 0.4])
    opt = LARS([p], lr=lr, momentum=m, weight_decay=wd, eta=eta)
    opt.step()
    # ||w|| = 5, ||g|| = 0.5: trust = 0.01 * 5 / (0.5 + 0.1 * 5) = 0.05.
    v1 = [0.05 * (0.3 + wd * 3.0), 0.05 * (0.4 + wd * 4.0)]
    w1 = [3.0 - v1[0], 4.0 - v1[1]]
    assert p.detach().tolist() == pytest.approx(w1)
    assert w1 == pytest.approx([2.97, 3.96])
    opt.step()
    n1 = math.hypot(*w1)
    trust = eta * n1 / (0.5 + wd * n1)
    v2 = [m * v1[i] + lr * trust * ([0.3, 0.4][i] + wd * w1[i]) for i in range(2)]
    assert p.detach().tolist() == pytest.approx([w1[i] - v2[i] for i in range(2)], rel=1e-12)


def test_lars_excluded_group_is_momentum_sgd():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(a.detach().clone())
    lars = LARS([{"params": [a], "weight_decay": 0.0, "lars_adapt": False}], lr=0.3, momentum=0.9)
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9)
    for _ in range(4):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_lars_zero_weight_uses_trust_one():
    p = _lars_param([0.0, 0.0], [1.0, 2.0])
    LARS([p], lr=0.5, momentum=0.0, eta=0.001).step()
    assert p.detach().tolist() == pytest.approx([-0.5, -1.0])


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="LARS needs"):
        LARS([nn.Parameter(torch.ones(1))], lr=0.1, eta=0)


def test_build_optimizer_and_set_lr():
    net = _Net()
    sgd = build_optimizer("sgd", net, 0.1, weight_decay=1e-4, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert sgd.param_groups[0]["nesterov"] is True
    lars = build_optimizer("lars", net, 0.1)
    assert isinstance(lars, LARS)
    assert [g["lars_adapt"] for g in lars.param_groups] == [True, False]
    set_lr(lars, 0.7)
    assert {g["lr"] for g in lars.param_groups} == {0.7}
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", net, 0.1)
    with pytest.raises(ValueError, match="drop --nesterov"):
        build_optimizer("lars", net, 0.1, nesterov=True)
