"""Schedule, weight-decay groups and loss against darknet's formula and torch's own losses."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cspx.config import OptimConfig
from cspx.optim import build_sgd, lr_at, param_groups, set_lr


def darknet_rate(i, base=0.1, max_batches=8_000_000, power=4, burn_in=1000):
    """darknet get_current_rate(), policy=poly, written out independently."""
    if i < burn_in:
        return base * pow(i / burn_in, power)
    return base * pow(1 - i / max_batches, power)


@pytest.mark.parametrize("step", [0, 1, 500, 999, 1000, 4_000_000, 7_999_999])
def test_lr_matches_darknet(step):
    assert lr_at(step, 0.1, 8_000_000, 4.0, 1000) == pytest.approx(darknet_rate(step), rel=1e-12, abs=0)


def test_lr_hand_values():
    # hand-computed: burn-in (i/1000)^4, decay (1 - i/8e6)^4, i not offset by burn-in
    assert lr_at(0, 0.1, 8_000_000) == 0.0
    assert lr_at(500, 0.1, 8_000_000) == pytest.approx(0.1 * 0.0625)          # 0.5^4
    assert lr_at(1000, 0.1, 8_000_000) == pytest.approx(0.1 * (1 - 1 / 8000) ** 4)
    assert lr_at(4_000_000, 0.1, 8_000_000) == pytest.approx(0.1 / 16)       # 0.5^4
    assert lr_at(7_999_999, 0.1, 8_000_000) == pytest.approx(0.1 * (1 / 8e6) ** 4)
    assert lr_at(8_000_000, 0.1, 8_000_000) == 0.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.fc = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(1))  # not a conv/linear weight

    def forward(self, x):
        return self.fc(self.dw(self.bn(self.conv(x))).mean((2, 3))) * self.scale


def test_weight_decay_reaches_exactly_conv_and_linear_weights():
    m = Net()
    groups = param_groups(m, 0.005)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(m.conv.weight), id(m.dw.weight), id(m.fc.weight)}
    assert groups[0]["weight_decay"] == 0.005 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.parameters()} - decay


def test_sgd_step_applies_decay_only_to_weights():
    """One SGD step with zero gradients: decayed tensors shrink by lr*wd, others stay."""
    m = Net()
    opt = build_sgd(m, OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.5), torch.device("cpu"))
    set_lr(opt, 0.1)  # the schedule sets the LR before every step
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        expect = before[n] * (1 - 0.1 * 0.5) if n in ("conv.weight", "dw.weight", "fc.weight") else before[n]
        assert torch.allclose(p, expect, rtol=0, atol=1e-7), n


def test_label_smoothed_loss_matches_torch_and_formula():
    from cspx.train_loop import training_loss
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    ours = training_loss(logits, labels, 0.1)
    ref = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    logp = logits.log_softmax(1)
    hand = (0.9 * -logp.gather(1, labels[:, None]).squeeze(1) + 0.1 * -logp.mean(1)).mean()
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(ours, hand, atol=1e-6)
