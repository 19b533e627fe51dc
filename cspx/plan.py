"""Stage 1 of a training run (setup), `--dry-run`: the plan of what a recipe will do, computed
without training."""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from cspx.config import Config
from cspx.data.loader import DataSplit
from cspx.optim import moment_buffers
from cspx.schedule import lr_for


def checkpoint_bytes(model: nn.Module, ema: bool, buffers: int = 1) -> int:
    """Model state + `buffers` optimizer tensors per parameter (SGD's momentum: 1, AdamW's
    moments: 2) + an EMA copy of the state."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(p.numel() * p.element_size() for p in model.parameters()) * buffers
    return state + moments + (state if ema else 0)


MAX_DECAYS = 4  # sched.kind=step: the first few decays are listed


def lr_points(cfg: Config):
    """(label, step, lr) at 0, the end of burn-in or warmup, the step kind's first decays, the
    unfreezing of the backbone and 25/50/75/100% of the run; labels of one step are joined."""
    t, s = cfg.train, cfg.sched
    pts = [("start", 0)]
    if 0 < s.burn_in < t.steps:
        pts.append(("end of burn-in", s.burn_in))
    if 0 < s.warmup_steps < t.steps:
        pts.append(("end of warmup", s.warmup_steps))
    if s.kind == "step":
        decays = range(s.decay_steps, t.steps, s.decay_steps)
        pts += [(f"decay {i + 1}", d) for i, d in enumerate(decays[:MAX_DECAYS])]
    if 0 < t.freeze_backbone_steps < t.steps:
        pts.append(("backbone unfrozen", t.freeze_backbone_steps))
    pts += [(f"{q}%", min(t.steps * q // 100, t.steps - 1) if q == 100 else t.steps * q // 100)
            for q in (25, 50, 75, 100)]
    labels: Dict[int, List[str]] = {}
    for name, step in pts:
        labels.setdefault(step, []).append(name)
    return [(", ".join(names), step, lr_for(cfg, step)) for step, names in sorted(labels.items())]


def _lr_lines(cfg: Config):
    mult = cfg.optim.head_lr_mult
    for i, (name, step, lr) in enumerate(lr_points(cfg)):
        head = f"head {lr * mult:<12.6g} " if mult != 1.0 else ""
        label = "learning rate" if i == 0 else ""
        yield f"  {label:<13} step {step:>11,}  {lr:<12.6g} {head}{name}"


def describe_aug(cfg: Config) -> str:
    """One line: the policy and the batch augmentations, as they will run."""
    a = cfg.aug
    policy = {"trivialaugment": "TrivialAugment Wide", "autoaugment": "AutoAugment (ImageNet)",
              "none": "no policy"}.get(a.policy)
    if policy is None:
        policy = (f"RandAugment {a.randaugment_ops} ops, magnitude {a.randaugment_magnitude:g}"
                  if a.randaugment_ops else "no policy")
    parts = [f"{a.img_size} px crop, flip {a.hflip:g}, {policy}"]
    if a.erase_prob:
        parts.append(f"random erasing p {a.erase_prob:g} ({a.erase_mode}, up to "
                     f"{a.erase_count} box{'es' * (a.erase_count > 1)})")
    if a.mixing:
        kinds = [f"mixup {a.mixup_alpha:g}" if a.mixup_alpha else "",
                 ("CutMix " + (f"sides {list(a.cutmix_minmax)}" if a.cutmix_minmax
                               else f"{a.cutmix_alpha:g}")) if a.cutmix_alpha or a.cutmix_minmax
                 else ""]
        parts.append(f"{' / '.join(k for k in kinds if k)} per {a.mix_mode}, p {a.mix_prob:g}"
                     f", soft targets (smoothing {cfg.train.label_smoothing:g})")
    return "; ".join(parts)


def describe_plan(cfg: Config, model: nn.Module, train: DataSplit, val: DataSplit,
                  world: int, micro: int) -> str:
    t = cfg.train
    params = sum(p.numel() for p in model.parameters())
    buffers = moment_buffers(cfg.optim)
    state = {0: "", 1: " + momentum", 2: " + AdamW moments"}[buffers]
    images = t.steps * t.batch_size
    lines = [
        "plan (dry run: recipe and data checked, nothing trained)",
        f"  model         {cfg.model.name}: {params:,} parameters, {cfg.model.num_classes} classes",
        f"  data          {len(train):,} train / {len(val):,} val images in "
        f"{train.num_classes} classes ({len(train.excluded) + len(val.excluded)} excluded), "
        f"{cfg.data.format}, {cfg.data.loader} loader",
        *([f"  {'':<13} val held out of the training images: {cfg.data.val_split:g} of each "
           f"class (data.val_split), drawn from seed {cfg.seed}"] if cfg.data.val_split else []),
        f"  batch         {t.batch_size} images per step = {world} rank(s) x {t.accum_steps} "
        f"accumulation x {micro} per forward pass; precision {t.precision}",
        f"  augment       {describe_aug(cfg)}",
        f"  steps         {t.steps:,} optimizer steps = {images / len(train):,.2f} epochs, "
        f"{images:,} images seen",
        f"  optimizer     {_optimizer(cfg)}",
        *_lr_lines(cfg),
        f"  eval          every {cfg.eval.every_steps or 'end-only'} steps at "
        f"{cfg.eval.img_size} px, crop {cfg.eval.crop_pct}",
        f"  checkpoints   every {cfg.checkpoint.every_steps or 'end-only'} steps, "
        f"keep {cfg.checkpoint.keep_last}, "
        f"about {checkpoint_bytes(model, cfg.ema.enabled, buffers) / 2**20:,.0f} MiB each "
        f"(model{state}{' + EMA' if cfg.ema.enabled else ''})",
        f"  output        {cfg.run.dir}",
    ]
    return "\n".join(lines)


def _optimizer(cfg: Config) -> str:
    o, s = cfg.optim, cfg.sched
    if o.name == "adamw":
        what = f"AdamW betas {list(o.betas)}, eps {o.eps:g}"
    else:
        what = f"SGD momentum {o.momentum:g}{', Nesterov' if o.nesterov else ''}"
    head = f", classifier LR x {o.head_lr_mult:g}" if o.head_lr_mult != 1.0 else ""
    frozen = (f", only the classifier trains for the first {cfg.train.freeze_backbone_steps:,} "
              f"steps" if cfg.train.freeze_backbone_steps else "")
    return f"{what}, weight decay {o.weight_decay:g}{head}{frozen}; {s.kind} schedule"
