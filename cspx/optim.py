"""The optimizer, built at setup and stepped by the loop: the learning-rate schedule and SGD, as
darknet defines them for CSPNet."""
from __future__ import annotations

import inspect
from typing import Dict, List

import torch
from torch import nn

from cspx.config import Config, OptimConfig


def lr_at(step: int, lr: float, steps: int, power: float = 4.0, burn_in: int = 1000) -> float:
    """LR for the optimizer update at `step` (0-based): darknet `policy=poly` with `burn_in`.

    burn-in:  lr * (step / burn_in)^power                for step < burn_in
    decay:    lr * (1 - step / steps)^power              otherwise (step is not offset by burn_in)
    Pure function of its arguments, so any step's LR can be printed, plotted or tested directly.
    """
    if step < burn_in:
        return lr * (step / burn_in) ** power
    return lr * max(0.0, 1.0 - step / steps) ** power


def lr_for(cfg: Config, step: int) -> float:
    """The recipe's LR at `step`: the one place the schedule (optim.lr, train.steps, sched.*)
    is computed; the loop, --dry-run's plan and cspx.resolve's burn-in warning all ask it."""
    return lr_at(step, cfg.optim.lr, cfg.train.steps, cfg.sched.power, cfg.sched.burn_in)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: conv and linear weights decay; BN parameters and all biases do not (darknet
    applies `decay` only to conv and connected-layer weights)."""
    decay, no_decay = [], []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_weight = name == "weight" and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_sgd(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.SGD:
    """SGD with the fused CUDA kernel where this torch has it, else the foreach implementation
    (one kernel per group of tensors instead of one per parameter). Its LR starts at 0: the
    schedule (`lr_for`) sets it before every step."""
    kwargs = {}
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.SGD).parameters:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=0.0, momentum=cfg.momentum,
                           nesterov=cfg.nesterov, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
