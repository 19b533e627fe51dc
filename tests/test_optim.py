"""Optimizers, weight-decay and classifier groups and the loss against hand-written updates,
timm's parameter grouping and torch's own losses (the LR schedule: tests/test_schedule.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cspx.config import OptimConfig
from cspx.errors import CspxError
from cspx.optim import OptimizerState, build_optimizer, param_groups, set_lr

CPU = torch.device("cpu")


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

    def get_classifier(self):
        return self.fc


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
    opt = build_optimizer(m, OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.5), CPU)
    set_lr(opt, 0.1)  # the schedule sets the LR before every step
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        decayed = n in ("conv.weight", "dw.weight", "fc.weight")
        expect = before[n] * (1 - 0.1 * 0.5) if decayed else before[n]
        assert torch.allclose(p, expect, rtol=0, atol=1e-7), n


@pytest.mark.parametrize("nesterov", [False, True])
def test_cpu_sgd_is_bit_equal_to_the_single_tensor_loop_and_foreach(nesterov):
    """timm's train.py gets torch's single-tensor SGD loop on the CPU (foreach defaults to CUDA
    only), and earlier cspx versions stepped with the foreach kernels: cspx's CPU optimizer
    must give the same bits as both, step after step, with the schedule changing the LR and
    weight decay on one group only. Net's tensors have sizes that are not multiples of the
    vector width (torch's fused CPU kernel rounds those elements differently)."""
    torch.manual_seed(0)
    ours, ref = Net(), Net()
    ref.load_state_dict(ours.state_dict())
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=nesterov)
    ref2 = Net()
    ref2.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, cfg, CPU)
    refs = [(m, torch.optim.SGD(param_groups(m, 0.05), lr=0.0, momentum=0.9, nesterov=nesterov,
                                foreach=foreach)) for m, foreach in ((ref, False), (ref2, True))]
    for step in range(5):
        lr = 0.1 * (step + 1) / 5
        set_lr(opt, lr)
        for _, o in refs:
            set_lr(o, lr)
        for p, q, r in zip(ours.parameters(), ref.parameters(), ref2.parameters()):
            p.grad = torch.randn_like(p)
            q.grad, r.grad = p.grad.clone(), p.grad.clone()
        for o in [opt] + [o for _, o in refs]:
            o.step()
        for m, o in refs:
            for (n, p), q in zip(ours.named_parameters(), m.parameters()):
                assert torch.equal(p, q), (step, n)
                assert torch.equal(opt.state[p]["momentum_buffer"], o.state[q]["momentum_buffer"])


def test_label_smoothed_loss_matches_torch_and_formula():
    from cspx.train_loop import training_loss
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    ours = training_loss(logits, labels, 0.1)
    ref = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    logp = logits.log_softmax(1)
    hand = (0.9 * -logp.gather(1, labels[:, None]).squeeze(1) + 0.1 * -logp.mean(1)).mean()
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(ours, hand, atol=1e-6)


def test_adamw_step_matches_the_hand_written_update():
    """One AdamW step from zero state: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and
    g^2, so w <- w (1 - lr wd) - lr g / (|g| + eps) on decayed tensors, and without the first
    factor on norms and biases."""
    m = Net()
    cfg = OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(m, cfg, CPU)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.99)
    set_lr(opt, 1e-3)
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    for n, p in m.named_parameters():
        decay = 0.05 if n in ("conv.weight", "dw.weight", "fc.weight") else 0.0
        g = grads[n].double()
        expect = before[n].double() * (1 - 1e-3 * decay) - 1e-3 * g / (g.abs() + 1e-6)
        # float32 weights: 2e-7 is a few ulps at 1.0, the update itself is ~1e-3
        torch.testing.assert_close(p.double(), expect, rtol=0, atol=2e-7, msg=n)


def test_decay_groups_equal_timms_on_the_csp_models():
    """timm's own rule (no decay for 1-D parameters and biases) picks the same tensors as cspx's
    (conv and linear weights only) on every CSP model cspx trains."""
    from timm.optim import param_groups_weight_decay

    from cspx.models import create_model
    for name in ("cspresnext_tiny", "cspresnext_tiny_gn"):
        model = create_model(name, num_classes=10)
        ours = param_groups(model, 0.05)
        theirs = param_groups_weight_decay(model, 0.05)
        def key(groups, wd):
            return {id(p) for g in groups if g["weight_decay"] == wd for p in g["params"]}
        assert key(ours, 0.05) == key(theirs, 0.05) and key(ours, 0.0) == key(theirs, 0.0), name


def test_head_lr_mult_gives_the_classifier_its_own_groups():
    m = Net()
    opt = build_optimizer(m, OptimConfig(lr=0.1, weight_decay=0.01, head_lr_mult=10.0), CPU)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay", "head_decay", "head_no_decay"]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[2] == {id(m.fc.weight)} and ids[3] == {id(m.fc.bias)}
    assert id(m.fc.weight) not in ids[0] | ids[1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01, 0.0]
    set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.02, 0.2, 0.2])
    # head_lr_mult 1: the two groups of every earlier cspx checkpoint
    assert len(build_optimizer(m, OptimConfig(), CPU).param_groups) == 2


def test_optimizer_state_resumes_the_recipes_settings_and_refuses_another_layout():
    m = Net()
    old = build_optimizer(m, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), CPU)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    set_lr(old, 1e-3)
    old.step()
    state = old.state_dict()
    # a forced change of weight decay takes effect; the moments are the checkpoint's
    new = build_optimizer(m, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01), CPU)
    OptimizerState(new).load_state_dict(state)
    assert new.param_groups[0]["weight_decay"] == 0.01
    assert torch.equal(new.state[m.conv.weight]["exp_avg"], old.state[m.conv.weight]["exp_avg"])
    for cfg, what in ((OptimConfig(name="sgd"), "sgd"),
                      (OptimConfig(name="adamw", head_lr_mult=10.0), "head_decay")):
        with pytest.raises(CspxError, match=rf"checkpoint: its optimizer \(adamw.*{what}"):
            OptimizerState(build_optimizer(m, cfg, CPU)).load_state_dict(state)


def test_fused_sgd_trains_an_unfrozen_backbone_as_the_cpu_loop_does():
    """A backbone unfrozen after train.freeze_backbone_steps joins groups whose classifier
    parameters have momentum buffers: torch's fused SGD (cspx's kernel on GPUs, and with
    train.on_nonfinite=skip) fails on such a group (a TypeError) unless fill_momentum gives the
    newcomers zero buffers, and then takes their first step as the CPU's single-tensor loop
    does (to the fused kernel's own rounding, last bits only: tests above). The classifier has
    the only state while frozen; with skips every trainable parameter gets a buffer at once."""
    from cspx.optim import fill_momentum
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.05)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    nets, opts = [], []
    for skips in (False, True):  # the CPU's single-tensor loop, the fused kernel
        torch.manual_seed(1)
        nets.append(Net())
        opts.append(build_optimizer(nets[-1], cfg, CPU, skips=skips))
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    for step in range(4):
        for net, opt in zip(nets, opts):
            head = set(net.fc.parameters())
            for p in net.parameters():
                p.requires_grad_(step >= 2 or p in head)
            fill_momentum(opt, skips=False)
            set_lr(opt, cfg.lr)
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step < 2:
            assert len(opts[1].state) == 2
        for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            bufs = [o.state.get(p, {}).get("momentum_buffer") for o, p in zip(opts, (a, b))]
            frozen = step < 2 and not name.startswith("fc.")
            assert (bufs[0] is None) == (bufs[1] is None) == frozen, (step, name)
            if bufs[0] is not None:
                torch.testing.assert_close(*bufs, rtol=0, atol=1e-6)
    fresh = Net()
    opt = build_optimizer(fresh, cfg, CPU, skips=True)
    fill_momentum(opt, skips=True)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
               for p in fresh.parameters())
