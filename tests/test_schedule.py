"""LR schedules against independent references: darknet's formula (written out here, as cspx
computed it before sched.kind existed), hand values, and timm's own schedulers."""
from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT
from cspx.config import Config, load_config, with_updates
from cspx.optim import build_optimizer, set_lr
from cspx.schedule import cosine_lr, lr_for, poly_lr, step_lr

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
POLY = [p for p in SHIPPED if yaml.safe_load(open(p))["sched"]["kind"] == "poly"]


def shipped(path, tmp_path):
    (tmp_path / "w.pth").touch()
    return load_config(path, [f"data.root={tmp_path}", f"model.init_from={tmp_path / 'w.pth'}"])


def darknet_rate(i, base=0.1, max_batches=8_000_000, power=4.0, burn_in=1000):
    """darknet get_current_rate(), policy=poly, in the expression order of cspx 0.1's lr_at."""
    if i < burn_in:
        return base * (i / burn_in) ** power
    return base * max(0.0, 1.0 - i / max_batches) ** power


def test_the_darknet_recipes_are_poly():
    names = {os.path.basename(p) for p in POLY}
    assert names == {"cspresnext50_ra.yaml", "cspresnext50_darknet.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", POLY)
def test_every_shipped_poly_recipe_keeps_its_lr_sequence_bit_for_bit(path, tmp_path):
    """Every step of burn-in and of the first 20,000 decay steps, then every 997th and the last
    1,000: equal to the last bit to the formula cspx used before schedules had kinds."""
    cfg = shipped(path, tmp_path)
    o, s, n = cfg.optim, cfg.sched, cfg.train.steps
    steps = set(range(min(n, s.burn_in + 20_000))) | set(range(0, n, 997)) | \
        set(range(max(0, n - 1000), n + 1))
    for i in sorted(steps):
        assert lr_for(cfg, i) == darknet_rate(i, o.lr, n, s.power, s.burn_in), (path, i)


def test_poly_hand_values():
    # burn-in (i/1000)^4, decay (1 - i/8e6)^4, i not offset by burn-in
    assert poly_lr(0, 0.1, 8_000_000) == 0.0
    assert poly_lr(500, 0.1, 8_000_000) == pytest.approx(0.1 * 0.0625)          # 0.5^4
    assert poly_lr(1000, 0.1, 8_000_000) == pytest.approx(0.1 * (1 - 1 / 8000) ** 4)
    assert poly_lr(4_000_000, 0.1, 8_000_000) == pytest.approx(0.1 / 16)       # 0.5^4
    assert poly_lr(8_000_000, 0.1, 8_000_000) == 0.0
    # a floor: min_lr + (lr - min_lr) (1 - i/steps)^p
    assert poly_lr(50, 0.1, 100, 2.0, 0, min_lr=0.01) == pytest.approx(0.01 + 0.09 * 0.25)


def test_cosine_and_step_hand_values():
    assert cosine_lr(0, 1e-3, 1000) == 1e-3
    assert cosine_lr(500, 1e-3, 1000) == pytest.approx(5e-4)                    # cos(pi/2) = 0
    assert cosine_lr(250, 1e-3, 1000, min_lr=1e-4) == \
        pytest.approx(1e-4 + 9e-4 * (1 + 0.5 ** 0.5) / 2)                       # cos(pi/4)
    assert cosine_lr(1000, 1e-3, 1000, min_lr=1e-5) == 1e-5
    # linear warmup from warmup_lr, then the curve at the same step (not shifted)
    assert cosine_lr(0, 1e-3, 1000, 100, 1e-5) == 1e-5
    assert cosine_lr(50, 1e-3, 1000, 100, 1e-5) == pytest.approx(1e-5 + 50 * (1e-3 - 1e-5) / 100)
    assert cosine_lr(100, 1e-3, 1000, 100, 1e-5) == cosine_lr(100, 1e-3, 1000)
    assert [step_lr(i, 0.1, 30) for i in (0, 29, 30, 59, 60, 90)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.0001])


def timm_scheduler(kind, opt, steps, s):
    """timm's scheduler for the cspx schedule `s`: updates per optimizer step, warmup not a
    prefix, no noise, one cycle."""
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
    common = dict(warmup_t=s["warmup_steps"], warmup_lr_init=s["warmup_lr"],
                  warmup_prefix=False, t_in_epochs=False, noise_range_t=None)
    if kind == "cosine":
        return CosineLRScheduler(opt, t_initial=steps, lr_min=s["min_lr"], cycle_limit=1, **common)
    if kind == "poly":
        return PolyLRScheduler(opt, t_initial=steps, power=s["power"], lr_min=s["min_lr"],
                               cycle_limit=1, **common)
    return StepLRScheduler(opt, decay_t=s["decay_steps"], decay_rate=s["decay_rate"], **common)


CASES = [  # (kind, sched keys, optim keys)
    ("cosine", dict(warmup_steps=0, warmup_lr=0.0, min_lr=0.0), dict(lr=0.1)),
    ("cosine", dict(warmup_steps=50, warmup_lr=2.5e-6, min_lr=1e-6), dict(lr=2.5e-4)),
    ("poly", dict(warmup_steps=0, warmup_lr=0.0, min_lr=0.0, power=4.0), dict(lr=0.1)),
    ("poly", dict(warmup_steps=30, warmup_lr=1e-4, min_lr=1e-5, power=2.0), dict(lr=3e-3)),
    ("step", dict(warmup_steps=0, warmup_lr=0.0, decay_steps=70, decay_rate=0.1), dict(lr=0.1)),
    ("step", dict(warmup_steps=25, warmup_lr=1e-4, decay_steps=90, decay_rate=0.5), dict(lr=0.02)),
]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def get_classifier(self):
        return self.fc


@pytest.mark.parametrize("head_lr_mult", [1.0, 10.0])
@pytest.mark.parametrize("kind, sched, optim", CASES)
def test_every_step_equals_timm(kind, sched, optim, head_lr_mult):
    """Each group's LR, set by cspx before every optimizer step, equals what timm's scheduler
    sets for that update (its `lr_scale` is cspx's head multiplier), for every step 0..steps."""
    steps = 300
    defaults = dict(power=4.0, burn_in=0, warmup_steps=0, warmup_lr=0.0, min_lr=0.0,
                    decay_steps=0, decay_rate=0.1)
    cfg = with_updates(Config(), train={"steps": steps}, sched={**defaults, **sched, "kind": kind},
                       optim={**optim, "head_lr_mult": head_lr_mult})
    ours = build_optimizer(Net(), cfg.optim, torch.device("cpu"))
    theirs = build_optimizer(Net(), cfg.optim, torch.device("cpu"))
    for group in theirs.param_groups:
        group["lr"] = cfg.optim.lr              # timm takes the peak LR from the groups
    timm_sched = timm_scheduler(kind, theirs, steps, {**defaults, **sched})
    assert len(ours.param_groups) == (4 if head_lr_mult != 1.0 else 2)
    for t in range(steps + 1):
        set_lr(ours, lr_for(cfg, t))
        timm_sched.step_update(num_updates=t)
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups], t


def test_the_finetune_recipe_equals_timms_cosine(tmp_path):
    """recipes/finetune.yaml over its whole run: timm's CosineLRScheduler with its warmup."""
    cfg = shipped(os.path.join(ROOT, "recipes", "finetune.yaml"), tmp_path)
    s = cfg.sched
    assert s.kind == "cosine" and cfg.optim.head_lr_mult != 1.0
    ours = build_optimizer(Net(), cfg.optim, torch.device("cpu"))
    theirs = build_optimizer(Net(), cfg.optim, torch.device("cpu"))
    for group in theirs.param_groups:
        group["lr"] = cfg.optim.lr
    timm_sched = timm_scheduler("cosine", theirs, cfg.train.steps, vars(s))
    for t in range(cfg.train.steps + 1):
        set_lr(ours, lr_for(cfg, t))
        timm_sched.step_update(num_updates=t)
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups], t
