"""The optimizer side of the recipe: the loss, parameter groups without weight decay, LARS.

Goyal et al. 2017 (arXiv 1706.02677): no weight decay on BN and bias; You et al. 2017 (arXiv
1708.03888): LARS. The schedule itself is pure math in pyddl.train.recipe.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LARS", "build_optimizer", "make_criterion", "set_lr", "split_param_groups"]

# Modules whose every parameter is a normalisation scale or shift (Goyal et al. section 5.1).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def make_criterion(label_smoothing: float = 0.0) -> nn.CrossEntropyLoss:
    """Return cross entropy with label smoothing (Szegedy et al. 2016), mean over the batch.

    The smoothed target puts 1 - eps + eps/K on the label and eps/K on every other class.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def split_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a group of BN/norm parameters and biases.

    Goyal et al. apply weight decay to weights only; LARS likewise leaves these parameters
    out of the trust-ratio adaptation, so the second group carries lars_adapt=False. Shared
    parameters are listed once; frozen ones (requires_grad False) are skipped.

    Returns:
        [{"params": weights, "weight_decay": wd, "lars_adapt": True},
         {"params": norms and biases, "weight_decay": 0.0, "lars_adapt": False}],
        leaving out an empty group.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017, Algorithm 1) with momentum.

    For each parameter tensor w with gradient g in a group with lars_adapt=True:
        trust = eta x ||w|| / (||g|| + wd x ||w||)   (1 when either norm is 0)
        v <- momentum x v + lr x trust x (g + wd x w);   w <- w - v
    Groups with lars_adapt=False (see `split_param_groups`) use trust = 1: plain momentum SGD.

    Example:
        >>> opt = LARS(split_param_groups(model, 5e-5), lr=3.2, momentum=0.9, eta=0.001)
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, lars_adapt: bool = True):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}"
            )
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_adapt=lars_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one LARS update; `closure` re-evaluates the loss as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, lr, momentum = group["weight_decay"], group["eta"], group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd != 0:
                    g = g.add(p, alpha=wd)
                scale = lr
                if group["lars_adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(p.grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eta * w_norm / (g_norm + wd * w_norm),
                        torch.ones_like(w_norm),
                    )
                    update = g.mul(trust * scale)
                else:
                    update = g.mul(scale)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(momentum).add_(update)
                p.sub_(buf)
        return loss


def build_optimizer(name: str, model: nn.Module, lr: float, *, momentum: float = 0.9,
                    weight_decay: float = 1e-4, nesterov: bool = False,
                    lars_eta: float = 0.001) -> torch.optim.Optimizer:
    """Build "sgd" (torch SGD) or "lars" over `split_param_groups(model, weight_decay)`.

    Raises:
        ValueError: an unknown optimizer name, or nesterov with lars.
    """
    groups = split_param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "lars":
        if nesterov:
            raise ValueError("LARS here uses heavy-ball momentum; drop --nesterov or use sgd")
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or lars")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (the recipe drives it per step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
