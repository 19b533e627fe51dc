"""forward_flops against two independent references: the same counter on timm's model, and a
count derived by hand from every conv/linear layer's shapes.

FLOPs depend only on shapes, so most models here live on the meta device: no memory, no compute."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cspx.bench.flops import forward_flops
from cspx.models import create_model


def shape_flops(model: nn.Module, img_size: int) -> int:
    """2 * MACs of every Conv2d and Linear, from the output shapes seen by forward hooks:
    a conv output element costs (C_in / groups) * kH * kW MACs, a linear one in_features."""
    total = [0]

    def conv(m: nn.Conv2d, _, out):
        kh, kw = m.kernel_size
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _, out):
        total[0] += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, img_size, img_size, device=device))
    for h in hooks:
        h.remove()
    return total[0]


def test_cspresnext50_flops():
    model = create_model("cspresnext50")
    flops = forward_flops(model, 224)
    assert model.training  # mode restored
    with torch.device("meta"):
        ref = timm.create_model("cspresnext50").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ref(torch.zeros(1, 3, 224, 224, device="meta"))
    assert flops == counter.get_total_flops()
    assert flops == shape_flops(ref, 224)
    assert flops == 6_148_849_664
    assert flops / 2 == pytest.approx(3.07e9, rel=0.01)  # timm's published 3.07 GMACs


@pytest.mark.parametrize("name,size", [("cspresnext50", 256), ("cspresnet50", 224),
                                       ("cspdarknet53", 256), ("cspresnext_tiny", 64)])
def test_flops_match_shape_count(name, size):
    with torch.device("meta"):
        model = create_model(name)
    assert forward_flops(model, size) == shape_flops(model, size)


def test_flops_scale_with_area():
    """At 224 and 256 px every feature map is exactly (8/7)^2 larger; only the fc stays."""
    with torch.device("meta"):
        model = create_model("cspresnext50")
    fc = 2 * 2048 * 1000
    f224, f256 = forward_flops(model, 224), forward_flops(model, 256)
    assert (f256 - fc) * 49 == (f224 - fc) * 64
