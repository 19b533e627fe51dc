"""The optimizer, built at setup and stepped by the loop: SGD (as darknet defines it for CSPNet)
or AdamW, torch's own, over parameter groups that keep weight decay off norms and biases and may
give the classifier its own LR. The LR itself comes from cspx.schedule."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List

import torch
from torch import nn

from cspx.config import OptimConfig
from cspx.errors import CspxError

GROUPS = ("decay", "no_decay", "head_decay", "head_no_decay")  # names, in optimizer order


def classifier(model: nn.Module) -> nn.Module:
    """The module whose parameters are "the head": timm's `get_classifier()` (CspNet: head.fc)."""
    # nn.Module.__getattr__ is typed Tensor | Module: any model with timm's method is taken
    return model.get_classifier()  # type: ignore[operator]


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> List[Dict]:
    """Conv and linear weights decay; BN parameters and all biases do not (darknet applies
    `decay` only to conv and connected-layer weights). With head_lr_mult != 1 the classifier's
    parameters form two groups of their own, whose LR the schedule's times `lr_scale` (timm's
    name for it); otherwise two groups, as in every checkpoint of older cspx versions."""
    head = {id(p) for p in classifier(model).parameters()} if head_lr_mult != 1.0 else set()
    groups: Dict[str, List[nn.Parameter]] = {name: [] for name in GROUPS}
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            is_weight = name == "weight" and isinstance(module, (nn.modules.conv._ConvNd,
                                                                 nn.Linear))
            group = ("head_" if id(p) in head else "") + ("decay" if is_weight else "no_decay")
            groups[group].append(p)
    out = [{"params": groups["decay"], "weight_decay": weight_decay, "name": "decay"},
           {"params": groups["no_decay"], "weight_decay": 0.0, "name": "no_decay"}]
    if head:
        out += [{"params": groups["head_decay"], "weight_decay": weight_decay,
                 "name": "head_decay", "lr_scale": head_lr_mult},
                {"params": groups["head_no_decay"], "weight_decay": 0.0,
                 "name": "head_no_decay", "lr_scale": head_lr_mult}]
    return out


def _kernel(cls: type, device: torch.device, skips: bool) -> Dict[str, bool]:
    """The fused CUDA kernel where this torch has it for `cls`, else the foreach implementation
    (one kernel per group of tensors instead of one per parameter); SGD on the CPU excepted, and
    `skips` (train.on_nonfinite=skip) takes the fused kernel on the CPU too (build_optimizer).

    SGD on the CPU takes the single-tensor loop, the one timm's train.py gets there (torch's
    foreach default covers CUDA only): it computes the same bits as the foreach implementation
    (the same per-tensor ops in the same order; tests/test_optim.py) in half its time, since
    foreach streams every parameter through memory once per operation (cspresnext50: 19 against
    40 ms of one thread's CPU time per step). torch's fused CPU kernel is faster still (9 ms)
    but rounds differently where a tensor's size is not a multiple of the vector width, which
    would end the bitwise equality with timm's step. AdamW keeps the foreach kernels on every
    device (the peer comparison with timm measured SGD only)."""
    fused = "fused" in inspect.signature(cls).parameters
    if fused and (device.type == "cuda" or skips):
        return {"fused": True}
    if skips:
        raise CspxError("train.on_nonfinite: skip needs torch's fused optimizers (torch >= 2.4)")
    if device.type == "cpu" and cls is torch.optim.SGD:
        return {"foreach": False}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, *,
                    skips: bool = False) -> torch.optim.Optimizer:
    """optim.name over `param_groups`. Every parameter is in a group, including any that do not
    train yet (train.freeze_backbone_steps): a parameter without a gradient is skipped by the
    step (no decay, no state) until it has one. Its LR starts at 0: the schedule
    (`cspx.schedule.lr_for`, through `set_lr`) sets it before every step.

    `skips` (train.on_nonfinite=skip): the optimizer must skip a step on the device when told
    to (a `found_inf` flag, as a GradScaler tells fused optimizers), which only the fused
    kernels do, so they are used on the CPU too (torch >= 2.4). The CPU's fused kernels round
    some elements differently (`_kernel`), which is why the default path keeps the others.
    AdamW's state starts as zeros, and its fused step takes a skipped step back off its
    step count; SGD's momentum buffers are made as zeros (`fill_momentum`)."""
    groups = param_groups(model, cfg.weight_decay, cfg.head_lr_mult)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps,
                                 **_kernel(torch.optim.AdamW, device, skips))
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           **_kernel(torch.optim.SGD, device, skips))


def fill_momentum(optimizer: torch.optim.Optimizer, *, skips: bool) -> None:
    """Zero momentum buffers for the trainable parameters of a fused SGD that have none, where
    the fused step needs them (called where parameters start to train: Trainer.wrap). torch's
    fused SGD takes a group's step as its first (buffers allocated uninitialized, the gradient
    copied in) only when no parameter of the group has a buffer yet. So:
    - a group where some parameters have one and others not, the backbone unfrozen after
      train.freeze_backbone_steps, would fail (a TypeError) and gets zeros for the others;
    - with `skips` (train.on_nonfinite=skip) a skipped first step would leave the buffers
      uninitialized, so every trainable parameter gets zeros from the start.
    A zero buffer gives the first step's own update (buf = momentum * 0 + grad). Frozen
    parameters get none (no state while frozen); the foreach kernel needs none."""
    if not optimizer.defaults.get("fused"):
        return
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        live = [p for p in group["params"] if p.requires_grad]
        have = [optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in live]
        if skips or any(have):
            for p, h in zip(live, have):
                if not h:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR in every group, times the group's lr_scale (the classifier's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def group_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """{"lr": the schedule's LR, "lr_head": the classifier's when it has its own} as set last."""
    out = {"lr": optimizer.param_groups[0]["lr"]}
    for group in optimizer.param_groups:
        if group.get("name") == "head_decay":
            out["lr_head"] = group["lr"]
    return out


def moment_buffers(cfg: OptimConfig) -> int:
    """State tensors the optimizer keeps per trained parameter (for checkpoint sizes)."""
    return 2 if cfg.name == "adamw" else int(cfg.momentum > 0)


class OptimizerState:
    """The optimizer as a checkpoint part: its state (moments, step counts) comes from the
    checkpoint, its settings (LR scale, weight decay, betas, kernels) stay the recipe's, so a
    --resume-force that changed them takes effect. A checkpoint whose groups do not match the
    recipe's (another optim.name, or optim.head_lr_mult added or removed) cannot be continued:
    one line says so."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ours = self.optimizer.param_groups
        theirs = state["param_groups"]
        names = [g.get("name") for g in theirs]
        def kind(groups):
            return "adamw" if "betas" in groups[0] else "sgd"
        if names != [g["name"] for g in ours] or kind(theirs) != kind(ours):
            raise CspxError(
                f"checkpoint: its optimizer ({kind(theirs)}, parameter groups {names}) does not "
                f"match the recipe's ({kind(ours)}, {[g['name'] for g in ours]}): optim.name or "
                f"optim.head_lr_mult changed; resume with the checkpoint's values, or start a "
                f"new run from its weights with model.init_from")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in ours]
        self.optimizer.load_state_dict(state)
        for group, s in zip(self.optimizer.param_groups, settings):
            group.update(s)
