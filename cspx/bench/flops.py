"""Benchmarks (the model mode's TFLOP/s) and tests, the work per image: forward FLOPs, counted
by PyTorch's own FlopCounterMode, and the values the convolutions write (the activation traffic
estimate of docs/performance.md starts from it).

The counter counts only matrix work: convolutions (2 * MACs: one multiply and one add per
weight tap per output element) and matmul/addmm (the fc). BatchNorm, activations, pooling,
residual additions and concatenation are not counted: a few elementwise ops on each of the
~12M BN outputs of cspresnext50 at 224 px, about 1% more.
So `forward_flops(...) / 2` is the "GMACs" figure papers and timm quote: cspresnext50 at
224 px is 6.15e9 FLOPs = 3.07 GMACs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: nn.Module, img_size: int = 224) -> int:
    """FLOPs of one forward pass on one [1, in_chans, img_size, img_size] image in eval mode.

    Runs on the model's device and dtype without gradients; the model's train/eval mode is
    restored afterwards. The count depends only on shapes, not on the weights.
    """
    ref = next(model.parameters())
    chans = int(getattr(model, "in_chans", 3))
    x = torch.zeros(1, chans, img_size, img_size, device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def conv_outputs(model: nn.Module, img_size: int = 224) -> int:
    """Values all convolutions write in one forward pass of one image (eval mode, no gradients;
    the model's mode is restored). cspresnext50 at 224 px: 12.1 million, from 55 convolutions."""
    ref = next(model.parameters())
    chans = int(getattr(model, "in_chans", 3))
    x = torch.zeros(1, chans, img_size, img_size, device=ref.device, dtype=ref.dtype)
    total = [0]

    def count(_m, _i, out: torch.Tensor) -> None:
        total[0] += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total[0]
