"""The model's building blocks, shared by the CSP models, named and ordered as timm's so
state_dicts match."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

# timm's "leaky_relu" is nn.LeakyReLU with PyTorch's default slope 0.01 (darknet's cfg files use
# 0.1); timm's released cspresnext50/cspresnet50/cspdarknet53 weights were trained with 0.01.
ACTIVATIONS = {
    "leaky_relu": lambda inplace: nn.LeakyReLU(0.01, inplace=inplace),
    "relu": lambda inplace: nn.ReLU(inplace=inplace),
    "silu": lambda inplace: nn.SiLU(inplace=inplace),
}


def _conv_padding(kernel_size: int, stride: int) -> int:
    """timm's symmetric padding: keeps the size at stride 1 and floors it at stride 2."""
    return ((stride - 1) + (kernel_size - 1)) // 2


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation, as one module so state-dict keys stay `<conv>.bn.*`.

    `drop` is always Identity (timm's drop-block slot); it is kept so module names match timm's.
    """

    def __init__(self, num_features: int, act: Optional[nn.Module] = None):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class SyncBatchNormAct2d(nn.SyncBatchNorm):
    """SyncBatchNorm + the drop/act children of the BatchNormAct2d it replaces."""
    drop: nn.Module  # set by convert_sync_batchnorm
    act: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class GroupNormAct2d(nn.GroupNorm):
    """GroupNorm + the drop/act children of the BatchNormAct2d it replaces. It normalises each
    sample on its own, so results do not depend on how a batch is split (accumulation, ranks)."""
    drop: nn.Module  # set by convert_groupnorm
    act: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def convert_groupnorm(module: nn.Module, max_groups: int = 8) -> nn.Module:
    """Replace every BatchNormAct2d by a GroupNormAct2d with gcd(channels, max_groups) groups,
    keeping its affine parameters (so zero-initialised last gammas stay zero) and its act."""
    if isinstance(module, BatchNormAct2d):
        out = GroupNormAct2d(math.gcd(module.num_features, max_groups), module.num_features,
                             module.eps)
        with torch.no_grad():
            out.weight.copy_(module.weight)
            out.bias.copy_(module.bias)
        out.drop, out.act = module.drop, module.act
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_groupnorm(child, max_groups))
    return module


class ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, act: str = "leaky_relu", apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride,
                              padding=_conv_padding(kernel_size, stride), groups=groups, bias=False)
        self.bn = BatchNormAct2d(out_chs, ACTIVATIONS[act](True) if apply_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale the rest by
    1/(1-p). Draws one Bernoulli per sample as timm does, so seeded runs match it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # [N, 1, 1, 1]
        return x * mask.div_(keep)


def drop_path_or_identity(p: float) -> nn.Module:
    return DropPath(p) if p else nn.Identity()


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm for models with BatchNormAct2d.

    torch's converter turns each BatchNormAct2d into a plain SyncBatchNorm whose forward ignores
    the `act` child, silently removing every activation. This one keeps them.
    """
    if isinstance(module, BatchNormAct2d):
        out = SyncBatchNormAct2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group)
        # share the tensors themselves, as torch's converter does (device, dtype, optimizer refs)
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.drop, out.act = module.drop, module.act
        out.train(module.training)
        return out
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
