"""The learning-rate schedule, read by the loop before every optimizer step: pure functions of the
step, so any step's LR can be printed, plotted or tested directly (`--dry-run` prints some).

Three kinds (`sched.kind`), each with an optional linear warmup (`sched.warmup_steps` from
`sched.warmup_lr`); `step` is the 0-based index of the optimizer update and `steps` is
`train.steps`:

  poly    darknet's `policy=poly`: lr * (1 - step/steps)^power, ending at min_lr; instead of the
          warmup, darknet's burn-in lr * (step/burn_in)^power
  cosine  min_lr + (lr - min_lr)/2 * (1 + cos(pi * step/steps))
  step    lr * decay_rate^(step // decay_steps)

The warmup is timm's: warmup_lr + step * (lr - warmup_lr) / warmup_steps while step <
warmup_steps; the decay that follows is not shifted by it (the decay at step i is the same with
or without a warmup). With no burn-in, each kind equals timm's PolyLRScheduler /
CosineLRScheduler / StepLRScheduler with t_in_epochs=False, warmup_prefix=False, no noise and one
cycle, step for step (tests/test_schedule.py checks it against timm).
"""
from __future__ import annotations

import math

from cspx.config import Config


def warmup_lr_at(step: int, lr: float, warmup_steps: int, warmup_lr: float) -> float:
    """Linear warmup from warmup_lr at step 0 towards lr at step warmup_steps (timm's form)."""
    return warmup_lr + step * ((lr - warmup_lr) / warmup_steps)


def poly_lr(step: int, lr: float, steps: int, power: float = 4.0, burn_in: int = 1000,
            warmup_steps: int = 0, warmup_lr: float = 0.0, min_lr: float = 0.0) -> float:
    """darknet `policy=poly` with `burn_in` (the shipped recipes' curve):

    burn-in:  lr * (step / burn_in)^power                           for step < burn_in
    decay:    min_lr + (lr - min_lr) * (1 - step / steps)^power     otherwise
    The decay's step is not offset by the burn-in. With min_lr 0 this is darknet's formula to
    the last bit (0 + (lr - 0) * x is lr * x exactly)."""
    if step < burn_in:
        return lr * (step / burn_in) ** power
    if step < warmup_steps:
        return warmup_lr_at(step, lr, warmup_steps, warmup_lr)
    return min_lr + (lr - min_lr) * max(0.0, 1.0 - step / steps) ** power


def cosine_lr(step: int, lr: float, steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
              min_lr: float = 0.0) -> float:
    """Half a cosine from lr at step 0 to min_lr at step `steps` (SGDR without restarts)."""
    if step < warmup_steps:
        return warmup_lr_at(step, lr, warmup_steps, warmup_lr)
    if step >= steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / steps))


def step_lr(step: int, lr: float, decay_steps: int, decay_rate: float = 0.1,
            warmup_steps: int = 0, warmup_lr: float = 0.0) -> float:
    """lr multiplied by decay_rate at every multiple of decay_steps."""
    if step < warmup_steps:
        return warmup_lr_at(step, lr, warmup_steps, warmup_lr)
    return lr * decay_rate ** (step // decay_steps)


def lr_for(cfg: Config, step: int) -> float:
    """The recipe's LR at `step`: the one place the schedule (optim.lr, train.steps, sched.*)
    is computed; the loop, --dry-run's plan and cspx.resolve's burn-in and warmup warnings all
    ask it. The classifier's groups take it times optim.head_lr_mult (cspx.optim.set_lr)."""
    s, lr, steps = cfg.sched, cfg.optim.lr, cfg.train.steps
    if s.kind == "poly":
        return poly_lr(step, lr, steps, s.power, s.burn_in, s.warmup_steps, s.warmup_lr, s.min_lr)
    if s.kind == "cosine":
        return cosine_lr(step, lr, steps, s.warmup_steps, s.warmup_lr, s.min_lr)
    return step_lr(step, lr, s.decay_steps, s.decay_rate, s.warmup_steps, s.warmup_lr)


def warmup_end(cfg: Config) -> int:
    """The first step after darknet's burn-in or the linear warmup (0 when there is none)."""
    return max(cfg.sched.burn_in, cfg.sched.warmup_steps)
