"""The training loop: one path for every precision, device and world size.

Checkpointed parts (model, optimizer, scaler, EMA, progress, loader, RNG) each expose
state_dict()/load_state_dict(); `Trainer.state_dict()` assembles them into one checkpoint of
plain tensors and Python values.

The hot loop never reads a device value back to the host: the loss is summed on the device and
read every `run.log_every_steps` steps, and the stop vote is a host-side collective.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cspx.checkpoint import FORMAT, FORMAT_VERSION, CheckpointManager
from cspx.config import Config
from cspx.distributed import DistEnv, StopVote, all_gather_objects, broadcast_buffers
from cspx.ema import ModelEma
from cspx.evaluate import autocast_for, evaluate
from cspx.optim import lr_at, set_lr
from cspx.runlog import MetricsLog
from cspx.signals import Preemption

log = logging.getLogger("cspx")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_all(seed: int) -> None:
    """Seed every generator a run may draw from: Python, NumPy, torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against smoothed targets: (1 - e) * one-hot + e / num_classes."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


class Progress:
    """Schedule position and the running loss window, so logs continue exactly on resume."""

    def __init__(self) -> None:
        self.step = 0              # optimizer steps done
        self.micro_step = 0        # micro-batches into the current accumulation (0 between steps)
        self.images = 0            # training images consumed, over all ranks
        self.best_top1: Optional[float] = None
        self.best_step: Optional[int] = None

    def state_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        if s.get("micro_step", 0) != 0:
            raise ValueError("checkpoint was taken inside a gradient accumulation")
        for k in vars(self):
            setattr(self, k, s[k])


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader, eval_loader, precision: str, metrics: MetricsLog,
                 ckpt: CheckpointManager, extra_state: Optional[Dict[str, Any]] = None):
        self.cfg, self.env = cfg, env
        self.model = model                     # the plain module: checkpoints, eval, EMA source
        self.optimizer = optimizer
        self.loader, self.eval_loader = train_loader, eval_loader
        self.precision, self.amp_dtype = precision, AMP_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
        self.ema = ModelEma(model, cfg.ema.decay) if cfg.ema.enabled else None
        self.metrics, self.ckpt = metrics, ckpt
        self.extra_state = extra_state or {}   # config, fingerprint, provenance: saved as is
        self.progress = Progress()
        self.preemption = Preemption()
        self.vote = StopVote(env)
        self.forward_model: nn.Module = model  # replaced by wrap(): DDP and/or compiled
        self._loss_sum = torch.zeros((), device=env.device)  # sum of micro-batch mean losses
        self._loss_n = 0
        self._window = (time.perf_counter(), 0)  # (time, images) at the last log
        self._pending = None                     # a batch taken early for the image grid

    # ----- setup ------------------------------------------------------------------------------
    def wrap(self) -> None:
        """DistributedDataParallel, then torch.compile; self.model stays the plain module."""
        m: nn.Module = self.model
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            m = nn.parallel.DistributedDataParallel(m, device_ids=ids, gradient_as_bucket_view=True)
        if self.cfg.model.compile:
            m = torch.compile(m)
        self.forward_model = m

    # ----- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The whole run state; a collective (gathers every rank's RNG and loader state)."""
        ranks: List[Dict[str, Any]] = all_gather_objects(
            {"rng": rng_state(self.env.device), "loader": self.loader.state_dict()}, self.env)
        p = self.progress
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "progress": {**p.state_dict(),
                             # informational: completed epochs and micro-batches into the current
                             # one (the loader state below is what resumes the data order)
                             "epoch": int(self.loader.epoch),
                             "epoch_position": round(self.loader.epoch % 1 * self.loader.batches_per_epoch),
                             "loss_sum": float(self._loss_sum), "loss_n": self._loss_n},
                "world_size": self.env.world,
                "ranks": ranks, **self.extra_state}

    def load_state_dict(self, state: Dict[str, Any], restore_ranks: bool = True) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                log.warning("checkpoint has no EMA weights: EMA starts from the current weights")
        self.progress.load_state_dict({k: state["progress"][k] for k in vars(self.progress)})
        self._loss_sum.fill_(state["progress"].get("loss_sum", 0.0))
        self._loss_n = state["progress"].get("loss_n", 0)
        if restore_ranks:
            mine = state["ranks"][self.env.rank]
            self.loader.load_state_dict(mine["loader"])
            set_rng_state(mine["rng"], self.env.device)

    def save(self, best: bool = False, blocking: bool = False) -> None:
        state = self.state_dict()
        self.ckpt.save(state, self.progress.step, best=best, blocking=blocking)

    # ----- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> None:
        t = self.cfg.train
        s = self.cfg.sched
        set_lr(self.optimizer, lr_at(self.progress.step, self.cfg.optim.lr, t.steps, s.power, s.burn_in))
        for micro in range(t.accum_steps):
            self.progress.micro_step = micro
            images, labels = self._next_batch()
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = micro == t.accum_steps - 1 or not self.env.distributed
            with nullcontext() if sync else self.forward_model.no_sync():
                with autocast_for(self.env.device, self.amp_dtype):
                    logits = self.forward_model(images)
                    loss = training_loss(logits, labels, t.label_smoothing)
                self.scaler.scale(loss / t.accum_steps).backward()
            self._loss_sum += loss.detach()
        self.progress.micro_step = 0
        if t.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self._loss_n += t.accum_steps
        self.progress.step += 1
        self.progress.images += t.batch_size

    def _next_batch(self):
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        return next(self.loader)

    def _log_image_grid(self) -> None:
        """Show the first augmented training images in TensorBoard (a fresh run's step 0)."""
        from cspx.data.transforms import mean_std
        self._pending = next(self.loader)
        x = self._pending[0][:16].float()
        mean, std = mean_std(x.device)
        self.metrics.image_grid("train/augmented_inputs", (x * std + mean).clamp(0, 1).cpu(), 0)

    # ----- the loop ---------------------------------------------------------------------------
    def fit(self, until: Optional[int] = None) -> bool:
        """Train to train.steps (or only to step `until`, for benchmarks; the schedule still
        spans train.steps). Returns False if stopped early by a signal (state saved)."""
        p = self.progress
        self.preemption.install()
        # a log file gets a progress line every 30 s instead of a stream of carriage returns
        bar = tqdm(total=self.cfg.train.steps, initial=p.step, disable=not self.env.is_main,
                   unit="step", dynamic_ncols=True, smoothing=0.05,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            with logging_redirect_tqdm(loggers=[log]):
                if p.step == 0 and self.metrics.tb is not None:
                    self._log_image_grid()
                return self._loop(bar, min(until or self.cfg.train.steps, self.cfg.train.steps))
        finally:
            self.vote.finish()
            self.preemption.restore()
            bar.close()
            self.ckpt.close()

    def _loop(self, bar, until: int) -> bool:
        cfg, p = self.cfg, self.progress
        total = cfg.train.steps
        self._window = (time.perf_counter(), p.images)
        while p.step < until:
            self.train_step()
            bar.update(1)
            step = p.step
            if step % cfg.run.log_every_steps == 0 or step == total:
                self._log_train(bar)
            best = False
            if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == total:
                best = self.run_eval()
            stopped = self.vote.poll(self.preemption.requested)
            periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            if periodic or best or stopped or step == total:
                self.save(best=best, blocking=stopped or step == total)
            self.ckpt.check()
            if stopped:
                return False
        return True

    def _log_train(self, bar) -> None:
        p = self.progress
        loss = (self._loss_sum / max(self._loss_n, 1)).item()  # the log-interval host sync
        now = time.perf_counter()
        t0, images0 = self._window
        ips = (p.images - images0) / max(now - t0, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        self._loss_sum.zero_()
        self._loss_n = 0
        self._window = (now, p.images)
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.4g} {ips:.0f} img/s ep {self.loader.epoch:.2f}")
        self.metrics.write("train", p.step, {"loss": loss, "lr": lr, "img_per_sec": ips,
                                             "epoch": self.loader.epoch,
                                             "bad_files": self.loader.bad_files})

    def run_eval(self) -> bool:
        """Evaluate the model (and EMA); returns True when top-1 is the best so far."""
        p = self.progress
        results = {}
        for name, module in (("eval", self.model), ("eval_ema", self.ema.module if self.ema else None)):
            if module is None:
                continue
            broadcast_buffers(module, self.env)  # every rank evaluates rank 0's BN statistics
            results[name] = r = evaluate(module, self.eval_loader, self.env, self.amp_dtype)
            self.metrics.write(name, p.step, {k: r[k] for k in ("top1", "top5", "loss", "count")})
            log.info(f"step {p.step}: {name} top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% "
                     f"loss {r['loss']:.4f} ({r['count']} images, {r['seconds']:.1f} s)")
        top1 = results["eval"]["top1"]
        if p.best_top1 is None or top1 > p.best_top1:
            p.best_top1, p.best_step = top1, p.step
            return True
        return False
