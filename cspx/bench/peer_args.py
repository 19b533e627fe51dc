"""The `peer` benchmark's commands (cspx/bench/peer.py): cspx's train.py and validate.py and timm's
own, for one comparison, with every setting that matters for the work of a run taken from one
cspx config and mapped to timm's flag.

`cspx_overrides` sets the comparison's keys on cspx's side; `timm_train_argv` maps the resulting
config to timm's train.py and refuses, in one line naming the key, what timm's train.py cannot
express or what this mapping does not carry over. tests/test_bench_peer.py checks the mapping
against timm's flag meanings and LR formula, written out.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List

from cspx.errors import CspxError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = 64                     # training images, and validation images of the short run


@dataclass(frozen=True)
class Peer:
    """What both sides of one comparison share, from the benchmark's flags."""
    recipe: str
    setting: str          # "plain" or "recipe"
    model: str
    batch: int            # images per optimizer step
    img_size: int         # px, training and evaluation
    workers: int          # DataLoader workers, each side
    device: str           # "cpu" or "cuda"
    precision: str        # fp32, bf16 or fp16
    channels_last: bool


def cspx_overrides(p: Peer, data: str, run_dir: str, steps: int) -> List[str]:
    """The recipe keys the peer comparison sets on cspx's side. The LR schedule becomes poly
    decay without burn-in or warmup, the recipe's power kept (timm's poly schedule warms up
    linearly and darknet's burn-in has no timm equivalent; the time of a step does not depend on
    the LR), and evaluation and the checkpoint come once, at the end, as timm's are set to.
    `plain` turns the per-image policy off (the issue's `aug.randaugment_ops=0`)."""
    out = [f"data.root={data}", f"run.dir={run_dir}", "data.loader=torch",
           f"data.workers={p.workers}", f"run.device={p.device}", f"model.name={p.model}",
           f"model.channels_last={str(p.channels_last).lower()}", f"train.batch_size={p.batch}",
           f"train.steps={steps}", f"train.precision={p.precision}", f"aug.img_size={p.img_size}",
           f"eval.img_size={p.img_size}", f"eval.batch_size={p.batch}", "eval.every_steps=0",
           "checkpoint.every_steps=0", "sched.kind=poly", "sched.burn_in=0",
           "sched.warmup_steps=0", "sched.min_lr=0", "sched.decay_steps=0"]
    if p.setting == "plain":
        out += ["aug.policy=none", "aug.randaugment_ops=0"]
    return out


def cspx_train_argv(p: Peer, data: str, run_dir: str, steps: int) -> List[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", p.recipe,
            *cspx_overrides(p, data, run_dir, steps)]


def _num(x: float) -> str:
    """A flag value as timm's argparse reads it back: 7.0 -> '7', 0.005 -> '0.005'."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def timm_train_argv(cfg, p: Peer, src: str, data: str, out: str, name: str, steps: int,
                    classes: int, images: int = IMAGES) -> List[str]:
    """timm's train.py command for the same run as cspx's `cfg` (the config cspx_overrides
    gives). timm runs whole epochs of images // batch optimizer steps, so `steps` must be a
    multiple of that; evaluation and checkpoint only after the last epoch (--val-interval)."""
    t, a, o, e = cfg.train, cfg.aug, cfg.optim, cfg.eval
    # (key, value, whether the mapping below carries it over): what timm's train.py cannot
    # express (darknet's colour jitter and rotation, compile, SyncBN), what this mode does not
    # map (it compares SGD recipes with RandAugment at most and no batch augmentation; timm
    # skips no non-finite step), and the schedule cspx_overrides sets
    s = cfg.sched
    checks = [("aug.hue", a.hue, a.hue == 0.0),
              ("aug.saturation", a.saturation, a.saturation == 1.0),
              ("aug.exposure", a.exposure, a.exposure == 1.0),
              ("aug.rotate", a.rotate, a.rotate == 0.0),
              ("aug.policy", a.policy, a.policy in ("randaugment", "none")),
              ("aug.mixup_alpha", a.mixup_alpha, not a.mixing),
              ("aug.cutmix_alpha", a.cutmix_alpha, not a.mixing),
              ("aug.erase_prob", a.erase_prob, a.erase_prob == 0.0),
              ("optim.name", o.name, o.name == "sgd"),
              ("optim.head_lr_mult", o.head_lr_mult, o.head_lr_mult == 1.0),
              ("train.freeze_backbone_steps", t.freeze_backbone_steps,
               t.freeze_backbone_steps == 0),
              ("train.on_nonfinite", t.on_nonfinite, t.on_nonfinite == "stop"),
              ("model.init_from", cfg.model.init_from, cfg.model.init_from is None),
              ("model.compile", cfg.model.compile, not cfg.model.compile),
              ("model.sync_bn", cfg.model.sync_bn, not cfg.model.sync_bn),
              ("sched.kind", s.kind, s.kind == "poly"),
              ("sched.burn_in", s.burn_in, s.burn_in == 0),
              ("sched.warmup_steps", s.warmup_steps, s.warmup_steps == 0),
              ("sched.min_lr", s.min_lr, s.min_lr == 0.0)]
    for key, value, mapped in checks:
        if not mapped:
            raise CspxError(f"{p.recipe}: {key}={value} is not mapped to timm's train.py; the "
                            f"peer mode compares recipes without it")
    from cspx.models import eval_protocol
    ev = eval_protocol(cfg.model.name, img_size=e.img_size, crop_pct=e.crop_pct,
                       interpolation=e.interpolation)  # a recipe's null eval.* resolved
    if ev.img_size != a.img_size:
        raise CspxError(f"{p.recipe}: eval.img_size={ev.img_size} differs from aug.img_size="
                        f"{a.img_size}; timm's train.py evaluates at its training size")
    micro = t.batch_size // t.accum_steps
    per_epoch = images // micro  # micro-batches of an epoch (timm drops the last partial one)
    if per_epoch == 0 or per_epoch % t.accum_steps:
        raise CspxError(f"--batch {t.batch_size} with train.accum_steps={t.accum_steps}: an "
                        f"epoch of {images} images must be a whole number of optimizer steps")
    per_epoch //= t.accum_steps  # optimizer steps of an epoch
    if steps % per_epoch:
        raise CspxError(f"--lengths: timm's train.py runs whole epochs of {per_epoch} steps "
                        f"({images} images / batch {t.batch_size}); give multiples of "
                        f"{per_epoch}")
    epochs = steps // per_epoch
    argv = [sys.executable, os.path.join(src, "train.py"), "--data-dir", data,
            "--train-split", "train", "--val-split", "val", "--model", cfg.model.name,
            "--num-classes", str(cfg.model.num_classes or classes), "--img-size", str(a.img_size),
            "--device", p.device, "-b", str(micro), "--grad-accum-steps", str(t.accum_steps),
            "-vb", str(e.batch_size), "--workers", str(cfg.data.workers), "--no-prefetcher",
            # SGD: timm's "sgd" is Nesterov, "momentum" is plain momentum
            "--opt", "sgd" if o.nesterov else "momentum", "--lr", _num(o.lr),
            "--momentum", _num(o.momentum), "--weight-decay", _num(o.weight_decay),
            # poly decay over the run's updates, no warm-up: cspx's sched with burn_in 0
            "--sched", "poly", "--decay-rate", _num(cfg.sched.power), "--sched-on-updates",
            "--warmup-epochs", "0", "--min-lr", "0", "--epochs", str(epochs),
            "--smoothing", _num(t.label_smoothing),
            "--scale", _num(a.scale[0]), _num(a.scale[1]),
            "--ratio", _num(a.ratio[0]), _num(a.ratio[1]), "--hflip", _num(a.hflip),
            "--train-interpolation", a.interpolation,
            "--crop-pct", _num(ev.crop_pct), "--interpolation", ev.interpolation,
            "--val-interval", str(epochs), "--checkpoint-hist", str(cfg.checkpoint.keep_last),
            "--output", out, "--experiment", name, "--seed", str(cfg.seed),
            "--log-interval", str(cfg.run.log_every_steps)]
    argv += (["--aa", f"rand-m{_num(a.randaugment_magnitude)}-n{a.randaugment_ops}"]
             if a.randaugment_ops else ["--color-jitter", "0"])
    if cfg.model.channels_last:
        argv.append("--channels-last")
    if cfg.model.drop_path_rate:
        argv += ["--drop-path", _num(cfg.model.drop_path_rate)]
    if t.precision != "fp32":
        argv += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[t.precision]]
    if t.clip_grad_norm is not None:
        argv += ["--clip-grad", _num(t.clip_grad_norm), "--clip-mode", "norm"]
    if cfg.ema.enabled:
        argv += ["--model-ema", "--model-ema-decay", _num(cfg.ema.decay)]
    return argv


def cspx_validate_argv(p: Peer, weights: str, val: str) -> List[str]:
    argv = [sys.executable, os.path.join(ROOT, "validate.py"), "--checkpoint", weights,
            "--data-dir", val, "--model", p.model, "--batch-size", str(p.batch),
            "--workers", str(p.workers), "--device", p.device, "--precision", p.precision,
            "--loader", "torch", "--img-size", str(p.img_size)]
    return argv + (["--channels-last"] if p.channels_last else [])


def timm_validate_argv(p: Peer, src: str, weights: str, val: str, classes: int) -> List[str]:
    """timm's validate.py on the same folder, weights and settings; crop and interpolation come
    from timm's pretrained config of the model, which cspx's evaluation preset copies."""
    argv = [sys.executable, os.path.join(src, "validate.py"), val, "--model", p.model,
            "--num-classes", str(classes), "--checkpoint", weights, "-b", str(p.batch),
            "-j", str(p.workers), "--device", p.device, "--no-prefetcher",
            "--img-size", str(p.img_size), "--log-freq", "1000"]
    if p.precision != "fp32":
        argv += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[p.precision]]
    return argv + (["--channels-last"] if p.channels_last else [])
