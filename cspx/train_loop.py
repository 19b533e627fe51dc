"""Stage 2 of a training run, the loop: optimizer steps, logging, evaluation and checkpoints, one
path for every precision, device and world size.

The parts a checkpoint holds (model, optimizer, GradScaler, EMA, progress; per rank the RNGs,
the loader and the batch augmentation's generators) each expose state_dict()/load_state_dict()
and register once with the `cspx.checkpoint.Checkpointer`, which decides after every step
whether a checkpoint is due (as torchtitan's trainer asks its checkpointer). The hot loop never
reads a device value back to the host: the loss is summed on the device and read every
`run.log_every_steps` steps, and the stop vote is a host-side collective. The divergence guard
(cspx.divergence) flags a non-finite loss or gradient norm on the device; it is read with the
loss and before every checkpoint, and a diverged run ends there (`RunFailure`, exit 1) without
writing a checkpoint.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cspx import divergence, precision, watchdog
from cspx.checkpoint import Checkpointer, NonfiniteState
from cspx.config import Config, resolved
from cspx.data.batch_aug import BatchAugment
from cspx.data.loader import Batch, EvalLoader, TrainLoader
from cspx.distributed import DistEnv, StopVote, broadcast_buffers, release_ddp, wrap_ddp
from cspx.ema import ModelEma
from cspx.errors import CspxError, RunFailure
from cspx.eval_metrics import evaluate
from cspx.freeze import BackboneFreeze
from cspx.optim import OptimizerState, fill_momentum, group_lrs, set_lr
from cspx.placement import place_model
from cspx.rng import RngState
from cspx.runlog import MetricsLog
from cspx.schedule import lr_for
from cspx.signals import Preemption

log = logging.getLogger("cspx")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def training_loss(logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy. Class labels (int64 (N,)): against smoothed targets (1 - e) * one-hot
    + e / num_classes. Soft targets (float (N, classes), from mixup / CutMix): against them as
    they are, -sum(t * log_softmax(logits)) (timm's SoftTargetCrossEntropy); they already hold
    the smoothing (cspx.data.mixup)."""
    if targets.is_floating_point():
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class Progress:
    """Schedule position and the running loss window, so logs continue exactly on resume."""

    FIELDS = ("step", "micro_step", "images", "best_top1", "best_step")

    def __init__(self, device: torch.device, loader: TrainLoader, guard: divergence.Guard):
        self.step = 0              # optimizer steps done
        self.micro_step = 0        # micro-batches into the current accumulation (0 between steps)
        self.images = 0            # training images consumed, over all ranks
        self.best_top1: Optional[float] = None
        self.best_step: Optional[int] = None
        self.loss_sum = torch.zeros((), device=device)  # sum of the finite micro-batch losses
        self.loss_n = 0            # micro-batches in the window
        # of which with a non-finite loss (left out of loss_sum, so the mean stays readable)
        self.loss_nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self._loader, self._guard = loader, guard

    def state_dict(self) -> Dict[str, Any]:
        ld = self._loader
        return {**{k: getattr(self, k) for k in self.FIELDS},
                # informational: completed epochs and micro-batches into the current one (the
                # loader's own state is what resumes the data order)
                "epoch": int(ld.epoch),
                "epoch_position": round(ld.epoch % 1 * ld.batches_per_epoch),
                "loss_sum": float(self.loss_sum), "loss_n": self.loss_n,
                "loss_nonfinite": int(self.loss_nonfinite),
                "nonfinite": self._guard.state_dict()}

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        if s.get("micro_step", 0) != 0:
            raise CspxError("checkpoint: taken inside a gradient accumulation, which cspx never "
                            "does; the file is not from this version of cspx")
        for k in self.FIELDS:
            setattr(self, k, s[k])
        self.loss_sum.fill_(s.get("loss_sum", 0.0))
        self.loss_n = s.get("loss_n", 0)
        self.loss_nonfinite.fill_(s.get("loss_nonfinite", 0))
        self._guard.load_state_dict(s.get("nonfinite") or {"read_step": s["step"]})


class Trainer:
    """The loop of one run. `model` is the plain module, placed (cspx.placement); `eval_loader`
    None runs no evaluation (the benchmarks). The stateful parts register with `ckpt` here."""

    def __init__(self, *, cfg: Config, env: DistEnv, model: nn.Module,
                 optimizer: torch.optim.Optimizer, train_loader: TrainLoader,
                 eval_loader: Optional[EvalLoader], metrics: MetricsLog, ckpt: Checkpointer):
        self.cfg, self.env = cfg, env
        self.model = model                     # the plain module: checkpoints, eval, EMA source
        self.optimizer = optimizer
        self.loader, self.eval_loader = train_loader, eval_loader
        self.precision = precision.of(cfg)
        self.scaler = torch.amp.GradScaler(env.device.type,
                                           enabled=precision.uses_loss_scaling(self.precision))
        self.ema = ModelEma(model, cfg.ema.decay) if cfg.ema.enabled else None
        self.metrics, self.ckpt = metrics, ckpt
        t = cfg.train
        self.guard = divergence.Guard(mode=t.on_nonfinite, max_skipped=t.max_skipped_steps,
                                      loss_scaling=self.scaler.is_enabled(), env=env)
        if self.guard.skip and not optimizer.defaults.get("fused"):
            raise ValueError("train.on_nonfinite=skip needs build_optimizer(..., skips=True)")
        # skip: the buffers a skipped step's forward pass changed are put back
        self._buffers = divergence.BufferRestore(model) if self.guard.skip else None
        self._params = list(model.parameters())
        self._read_at = -1  # the step of the guard's last read
        self.progress = Progress(env.device, train_loader, self.guard)
        self.rng = RngState(env.device)
        # random erasing and mixup / CutMix on each micro-batch, after either loader; label
        # smoothing goes into the soft targets when mixing, else into the loss (training_loss)
        classes = resolved(cfg.model.num_classes, "model.num_classes")
        self.batch_aug = BatchAugment(aug=cfg.aug, num_classes=classes,
                                      label_smoothing=cfg.train.label_smoothing,
                                      device=env.device, seed=cfg.seed, rank=env.rank)
        self.preemption = Preemption()
        self.vote = StopVote(env)
        steps = cfg.train.freeze_backbone_steps
        self.freeze = BackboneFreeze(model, steps=steps) if steps else None
        self.forward_model: nn.Module = model  # replaced by wrap(): DDP and/or compiled
        self._compile_backend = "inductor"
        self._graphs = False                   # wrap(): CUDA graphs replay the forward pass
        self._window = (time.perf_counter(), 0)  # (time, images) at the last log
        self._pending: Optional[Batch] = None    # a batch taken early for the image grid
        # the optimizer's state from a checkpoint, its settings from the recipe (OptimizerState)
        ckpt.register(shared={"model": model, "optimizer": OptimizerState(optimizer),
                              "scaler": self.scaler, "ema": self.ema, "progress": self.progress},
                      per_rank={"rng": self.rng, "loader": train_loader,
                                "batch_aug": self.batch_aug})

    # ----- setup ------------------------------------------------------------------------------
    def wrap(self, compile_backend: Optional[str] = None) -> None:
        """DistributedDataParallel, then torch.compile (cspx.placement.place_model); self.model
        stays the plain module. Called once at setup (after a resume), and again where the
        backbone unfreezes: DDP reduces only the parameters that required gradients when it was
        built, and torch.compile guards on them (cspx.freeze). `compile_backend` other than
        inductor is for rehearsing the compile path on a CPU (scripts/gpu_check.sh --rehearse:
        aot_eager traces and differentiates the model without generating kernels); a later
        call keeps the first one's."""
        self._compile_backend = compile_backend or self._compile_backend
        if self.freeze is not None:
            self.freeze.apply(self.progress.step)
        fill_momentum(self.optimizer, skips=self.guard.skip)  # parameters that train from now
        release_ddp(self.forward_model)
        m = self.cfg.model
        self.forward_model = place_model(
            self.model, device=self.env.device, channels_last=m.channels_last, compile=m.compile,
            compile_mode=m.compile_mode, compile_backend=self._compile_backend,
            wrap=partial(wrap_ddp, env=self.env) if self.env.distributed else None)
        # CUDA graphs (reduce-overhead) reuse their output buffers from one replay to the next:
        # each forward pass is marked as a new iteration, as this loop never keeps an output
        self._graphs = self.cfg.model.compile and self.cfg.model.compile_mode == "reduce-overhead"

    # ----- checkpoint -------------------------------------------------------------------------
    def restore(self, state: Dict[str, Any], *, same_world: bool = True,
                force: bool = False) -> None:
        """Every registered part from a checkpoint's `state` (before `wrap`)."""
        missing = self.ckpt.restore(state, same_world=same_world, force=force)
        if "ema" in missing and self.ema is not None:
            log.warning("checkpoint has no EMA weights: EMA starts from the checkpoint's weights")
            self.ema.copy_from(self.model)

    # ----- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> None:
        t, p = self.cfg.train, self.progress
        if self.freeze is not None and self.freeze.apply(p.step):
            log.info(f"step {p.step}: the backbone is unfrozen, every parameter trains from now on")
            self.wrap()
        set_lr(self.optimizer, lr_for(self.cfg, p.step))
        if self._buffers is not None:
            self._buffers.save()
        loss_bad = None
        for micro in range(t.accum_steps):
            p.micro_step = micro
            images, targets = self._next_batch()  # labels, or soft targets when mixing
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = micro == t.accum_steps - 1 or not self.env.distributed
            # not sync: forward_model is DDP (or compiled DDP, which forwards the attribute);
            # nn.Module.__getattr__ is typed Tensor | Module
            with nullcontext() if sync else self.forward_model.no_sync():  # type: ignore[operator]
                if self._graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with precision.autocast(self.precision, self.env.device):
                    logits = self.forward_model(images)
                    loss = training_loss(logits, targets, t.label_smoothing)
                self.scaler.scale(loss / t.accum_steps).backward()
            bad = ~torch.isfinite(loss.detach())
            p.loss_sum += torch.where(bad, 0.0, loss.detach())
            p.loss_nonfinite += bad
            loss_bad = bad if loss_bad is None else loss_bad | bad
        p.micro_step = 0
        self.scaler.unscale_(self.optimizer)  # a no-op without loss scaling
        if t.clip_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(self._params, t.clip_grad_norm)
        else:
            norm = divergence.gradient_norm(self._params)
        assert loss_bad is not None  # train.accum_steps >= 1 micro-batches ran
        found_inf = self.guard.step(p.step + 1, loss_bad, norm)
        if found_inf is None:
            self.scaler.step(self.optimizer)
        else:
            self._fused_step(found_inf)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if found_inf is not None:
            assert self._buffers is not None  # both come with train.on_nonfinite=skip
            self._buffers.restore(found_inf)
        if self.ema is not None:
            self.ema.update(self.model, found_inf)
        p.loss_n += t.accum_steps
        p.step += 1
        p.images += t.batch_size

    def _fused_step(self, found_inf: torch.Tensor) -> None:
        """The fused optimizer's step, skipped on the device where `found_inf` is 1: the
        contract a GradScaler keeps with fused optimizers (a `found_inf` attribute; the
        gradients are unscaled already, so no `grad_scale`). With fp16 the GradScaler's own
        update() still adjusts the scale from the inf checks of its unscale_()."""
        # an attribute of that contract, not of torch.optim.Optimizer's type
        self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]

    def _next_batch(self) -> Batch:
        """The next micro-batch, through the batch augmentation: (images, labels or targets)."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        return self.batch_aug(*next(self.loader))

    def _log_image_grid(self) -> None:
        """Show the first training images as the model sees them (every augmentation, mixing
        included) in TensorBoard (a fresh run's step 0)."""
        from cspx.data.transforms import mean_std
        batch = self._pending = self._next_batch()
        x = batch[0][:16].float()
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

    def _loop(self, bar, until: int) -> bool:
        cfg, p = self.cfg, self.progress
        total = cfg.train.steps
        self._window = (time.perf_counter(), p.images)
        while p.step < until:
            self.train_step()
            watchdog.progress("training step", p.step)
            bar.update(1)
            step = p.step
            if step % cfg.run.log_every_steps == 0 or step == total:
                self._log_train(bar)
            best = False
            if self.eval_loader is not None and (
                    (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == total):
                best = self.run_eval()
            stopped = self.vote.poll(self.preemption.requested)
            if self.ckpt.due(step, last_step=total, best=best, stopping=stopped):
                self.check_divergence(step)  # never a checkpoint of a diverged run
            try:
                self.ckpt.maybe_save(step, last_step=total, best=best, stopping=stopped)
            except NonfiniteState as e:
                raise RunFailure(self._diverged(str(e), since=self.guard.read_step,
                                                step=step)) from None
            if stopped:
                return False
        return True

    # ----- divergence -------------------------------------------------------------------------
    def check_divergence(self, step: int) -> None:
        """Read the divergence guard, once per step (a collective: every rank reads at the same
        steps): log skipped steps, and end the run if it diverged (RunFailure on every rank)."""
        if self._read_at == step:
            return
        self._read_at = step
        self._act(self.guard.read(step))

    def _act(self, r: divergence.Reading) -> None:
        divergence.report(r, skip=self.guard.skip)
        if r.diverged:
            raise RunFailure(self._diverged(r.diverged, since=r.since, step=r.step))

    def _diverged(self, what: str, *, since: int, step: int) -> str:
        t = self.cfg.train
        return divergence.failure_line(
            what, since=since, step=step, newest=self.ckpt.settle() if self.env.is_main else None,
            is_main=self.env.is_main, lr=self.cfg.optim.lr, clip=t.clip_grad_norm,
            precision=self.precision, mode=t.on_nonfinite)

    def _log_train(self, bar) -> None:
        p = self.progress
        kept = p.loss_n - p.loss_nonfinite  # micro-batches whose loss was finite
        mean = torch.where(kept > 0, p.loss_sum / kept.clamp(min=1), float("nan"))
        # the log-interval host sync: the window's mean loss and its non-finite losses
        loss, nonfinite = torch.stack([mean, p.loss_nonfinite.to(mean.dtype)]).tolist()
        now = time.perf_counter()
        t0, images0 = self._window
        ips = (p.images - images0) / max(now - t0, 1e-9)
        lrs = group_lrs(self.optimizer)  # the LRs of the step just taken
        self._read_at = p.step
        reading = self.guard.read(p.step)  # the divergence guard, read with the loss
        p.loss_sum.zero_()
        p.loss_nonfinite.zero_()
        p.loss_n = 0
        self._window = (now, p.images)
        bar.set_postfix_str(f"loss {loss:.4f} lr {lrs['lr']:.4g} {ips:.0f} img/s "
                            f"ep {self.loader.epoch:.2f}")
        values = {"loss": loss, **lrs, "img_per_sec": ips, "epoch": self.loader.epoch,
                  "bad_files": self.loader.bad_files, "skipped_steps": reading.skipped}
        if nonfinite:
            values["nonfinite_losses"] = int(nonfinite)
        self.metrics.write("train", p.step, values)
        self._act(reading)

    def run_eval(self) -> bool:
        """Evaluate the model (and EMA); returns True when top-1 is the best so far."""
        p = self.progress
        if self.eval_loader is None:
            raise ValueError("run_eval: this Trainer has no eval_loader")
        loader = self.eval_loader
        results = {}
        ema = self.ema.module if self.ema else None
        for name, module in (("eval", self.model), ("eval_ema", ema)):
            if module is None:
                continue
            broadcast_buffers(module, self.env)  # every rank evaluates rank 0's BN statistics
            try:
                results[name] = r = evaluate(module, loader, self.env, self.precision)
            except OOM:
                bs = self.cfg.eval.batch_size
                raise CspxError(f"out of memory during evaluation on {self.env.device} with "
                                f"eval.batch_size={bs} images per rank; lower it (e.g. "
                                f"eval.batch_size={max(1, bs // 2)})") from None
            self.metrics.write(name, p.step, {k: r[k] for k in ("top1", "top5", "loss", "count")})
            log.info(f"step {p.step}: {name} top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% "
                     f"loss {r['loss']:.4f} ({r['count']} images, {r['seconds']:.1f} s)")
        top1 = results["eval"]["top1"]
        if p.best_top1 is None or top1 > p.best_top1:
            p.best_top1, p.best_step = top1, p.step
            return True
        return False
