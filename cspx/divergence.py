"""The loop's guard against divergence, at every optimizer step: a loss or gradient norm that is
not finite (NaN, inf) is found on the device, without a host sync, and the run stops or skips
the step (`train.on_nonfinite`).

Per step, device operations only (`Guard.step`):
  loss_bad   a micro-batch loss of this rank is not finite
  grad_bad   the gradient norm is not finite (after unscaling; DDP's gradients are all-reduced,
             so every rank sees the same norm and decides the same)
  skipped    the step's update was not applied: grad_bad under `skip` (the fused optimizer
             kernel's `found_inf`, the flag a GradScaler hands fused optimizers), and with fp16
             every GradScaler skip (grad_bad with loss scaling; `stop` keeps GradScaler's path)
The flags are read (`Guard.read`: one small all-reduce under torchrun, then one device-to-host
copy) where the loop reads the loss anyway, every `run.log_every_steps`, and before every
checkpoint. A run has diverged when, since the last read:
  stop: some rank's loss was not finite, or the gradient norm was not finite without loss
        scaling (fp16's skips are GradScaler's search for a scale: counted, not divergence);
  both: `train.max_skipped_steps` steps in a row were skipped.
The trainer then ends the run (`RunFailure`, exit 1) without writing a checkpoint: every
checkpoint is written after a read that found nothing, and `integrity.nonfinite_parts` checks
the state itself before it is written, as the last line of defence.

A skipped step leaves the weights, the momentum, the BatchNorm statistics (`BufferRestore`) and
the EMA (`ema.ModelEma.update`) as they were; its batch is consumed. The skip counters are part
of the checkpoint (in `progress`), so a resumed run counts on exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
from torch import nn

from cspx.distributed import DistEnv

log = logging.getLogger("cspx")

NONE = 2 ** 62  # "no such step": larger than any step, so a minimum keeps the first real one
# the guard's device tensor (int64): first step with a non-finite loss / gradient norm since the
# last read, steps skipped in all, consecutive skipped steps now, first step at which the
# consecutive count reached train.max_skipped_steps
FIRST_LOSS, FIRST_GRAD, SKIPPED, STREAK, FIRST_TRIP = range(5)


@dataclass(frozen=True)
class Reading:
    """What a read found: the window of steps (after `since`, up to `step`) and its events."""
    since: int
    step: int
    first_loss: Optional[int]   # first step with a non-finite loss (on any rank)
    first_grad: Optional[int]   # first step with a non-finite gradient norm
    skipped: int                # steps skipped since the run began
    new_skips: int              # of which in this window
    first_trip: Optional[int]   # step at which max_skipped_steps consecutive skips were reached
    diverged: Optional[str]     # what makes this a divergence, or None


class Guard:
    """Watches every step for non-finite values; `mode` is train.on_nonfinite. Its state is the
    progress part's `nonfinite` entry in a checkpoint."""

    def __init__(self, *, mode: str, max_skipped: int, loss_scaling: bool, env: DistEnv):
        self.skip, self.max_skipped, self.loss_scaling = mode == "skip", max_skipped, loss_scaling
        self.env = env
        self.t = torch.tensor([NONE, NONE, 0, 0, NONE], dtype=torch.int64, device=env.device)
        self.read_step = 0      # the step of the last read (host)
        self.read_skipped = 0   # SKIPPED at the last read (host)

    @property
    def mode(self) -> str:
        return "skip" if self.skip else "stop"

    # ----- every step: device operations only ---------------------------------------------------
    def step(self, step: int, loss_bad: torch.Tensor, grad_norm: torch.Tensor
             ) -> Optional[torch.Tensor]:
        """Record optimizer step `step` (1-based) from its losses' flag and its gradient norm.
        Returns, under `skip`, the fused optimizer's `found_inf` (float32 0-dim; 1.0 skips the
        update), else None."""
        t = self.t
        grad_bad = ~torch.isfinite(grad_norm)
        t[:FIRST_GRAD + 1] = torch.minimum(
            t[:FIRST_GRAD + 1], torch.where(torch.stack([loss_bad, grad_bad]), step, NONE))
        skipped = grad_bad if (self.skip or self.loss_scaling) else torch.zeros_like(grad_bad)
        t[SKIPPED] += skipped
        t[STREAK] = (t[STREAK] + 1) * skipped
        t[FIRST_TRIP] = torch.minimum(t[FIRST_TRIP],
                                      torch.where(t[STREAK] >= self.max_skipped, step, NONE))
        return grad_bad.to(torch.float32) if self.skip else None

    # ----- at a loss read or before a checkpoint: one collective, one sync ------------------------
    def read(self, step: int) -> Reading:
        """What happened since the last read (every rank calls it at the same step)."""
        t = self.t
        # "NONE - first step" is 0 for no event and largest for the earliest one, so a maximum
        # over ranks finds the earliest; the skip count is the same on every rank
        v = torch.stack([NONE - t[FIRST_LOSS], NONE - t[FIRST_GRAD], NONE - t[FIRST_TRIP],
                         t[SKIPPED]])
        if self.env.distributed:
            import torch.distributed as dist
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
        first_loss, first_grad, first_trip, skipped = v.tolist()
        t[FIRST_LOSS:FIRST_GRAD + 1] = NONE
        since, self.read_step = self.read_step, step
        new, self.read_skipped = skipped - self.read_skipped, skipped
        r = Reading(since=since, step=step, first_loss=NONE - first_loss if first_loss else None,
                    first_grad=NONE - first_grad if first_grad else None, skipped=skipped,
                    new_skips=new, first_trip=NONE - first_trip if first_trip else None,
                    diverged=None)
        return replace(r, diverged=_diverged(r, skip=self.skip, loss_scaling=self.loss_scaling,
                                             max_skipped=self.max_skipped))

    # ----- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, int]:
        skipped, streak = self.t[SKIPPED:STREAK + 1].tolist()
        return {"skipped": skipped, "streak": streak, "read_step": self.read_step,
                "read_skipped": self.read_skipped}

    def load_state_dict(self, s: Dict[str, int]) -> None:
        """From a checkpoint's progress["nonfinite"] (absent in older checkpoints: all zero)."""
        self.t.copy_(torch.tensor([NONE, NONE, s.get("skipped", 0), s.get("streak", 0), NONE]))
        self.read_step = s.get("read_step", 0)
        self.read_skipped = s.get("read_skipped", s.get("skipped", 0))


def _diverged(r: Reading, *, skip: bool, loss_scaling: bool, max_skipped: int) -> Optional[str]:
    """What makes a reading a divergence (module doc), or None."""
    if r.first_trip is not None:
        return (f"{max_skipped} steps in a row were skipped for a non-finite gradient norm, the "
                f"last at step {r.first_trip} (train.max_skipped_steps={max_skipped})")
    if not skip and r.first_loss is not None:
        return f"the loss became non-finite at step {r.first_loss}"
    if not skip and not loss_scaling and r.first_grad is not None:
        return f"the gradient norm became non-finite at step {r.first_grad}"
    return None


def report(r: Reading, *, skip: bool) -> None:
    """The log line of a read's skipped steps (a warning under `skip`; fp16's GradScaler skips
    under `stop` are routine, and logged at info level)."""
    if not r.new_skips:
        return
    first = f", the first at step {r.first_grad}" if r.first_grad is not None else ""
    window = f"step {r.step}" if r.since + 1 >= r.step else f"steps {r.since + 1}-{r.step}"
    line = (f"{window}: {r.new_skips} step(s) skipped for a non-finite gradient norm{first}; "
            f"{r.skipped} skipped in all")
    (log.warning if skip else log.info)(line + ("" if skip else " (fp16 loss scaling)"))


def gradient_norm(parameters: List[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (clip_grad_norm_'s), on the device."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=parameters[0].device if parameters else None)
    return torch.nn.utils.get_total_norm(grads, 2.0)


class BufferRestore:
    """A model's buffers (BatchNorm running statistics and step counts), copied before each
    forward pass and put back where the step is skipped: a non-finite batch would otherwise leave
    NaN in the running statistics, which the update's skip does not undo. Device operations only:
    one copy per buffer group before the step, one `torch.where` per buffer after it."""

    def __init__(self, model: nn.Module):
        self.live = [b for b in model.buffers()]
        self.saved = [torch.empty_like(b) for b in self.live]

    def save(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self, skipped: torch.Tensor) -> None:
        """`skipped`: the step's found_inf (0-dim, 1.0 where skipped)."""
        cond = skipped.bool()
        for live, saved in zip(self.live, self.saved):
            torch.where(cond, saved, live, out=live)


def _hint(*, lr: float, clip: Optional[float], precision: str, mode: str) -> str:
    """What to change, with the values the run has now."""
    clip_now = "off" if clip is None else f"{clip:g}"
    keys = [f"lower optim.lr (now {lr:g})", f"set train.clip_grad_norm (now {clip_now})",
            f"change train.precision (now {precision})"]
    if mode == "stop":
        keys.append("set train.on_nonfinite=skip")
    return ", ".join(keys[:-1]) + " or " + keys[-1]


def failure_line(what: str, *, since: int, step: int, newest: Optional[str], is_main: bool,
                 lr: float, clip: Optional[float], precision: str, mode: str) -> str:
    """The one line a diverged run ends with: the steps since the last good reading (`since`,
    exclusive) to `step`, the last good checkpoint (`newest`, known on rank 0) and what to
    change (`lr`, `clip`, `precision`: the run's values; `mode`: train.on_nonfinite)."""
    hint = _hint(lr=lr, clip=clip, precision=precision, mode=mode)
    window = f"step {step}" if since + 1 >= step else f"steps {since + 1}-{step}"
    head = (f"training diverged in {window} (train.on_nonfinite={mode}): {what}; "
            f"no checkpoint holding it was written")
    if newest:
        return (f"{head}; the last good checkpoint is {newest}. To continue from it, "
                f"{hint}, and run the same command with --resume auto --resume-force")
    if not is_main:
        return f"{head} (rank 0 names the last good checkpoint)"
    return f"{head}, nor any before it. To start again, {hint}"
