"""Stage 1 of a training run (setup), `--dry-run`: the plan of what a recipe will do, computed
without training."""
from __future__ import annotations

from torch import nn

from cspx.config import Config
from cspx.data.loader import DataSplit
from cspx.optim import lr_for


def checkpoint_bytes(model: nn.Module, ema: bool) -> int:
    """Model state + one SGD momentum buffer per parameter (+ EMA copy of the state)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + momentum + (state if ema else 0)


def lr_points(cfg: Config):
    """(label, step, lr) at 0, the end of burn-in and 25/50/75/100% of the run."""
    t, s = cfg.train, cfg.sched
    pts = [("start", 0)]
    if 0 < s.burn_in < t.steps:
        pts.append(("end of burn-in", s.burn_in))
    pts += [(f"{q}%", min(t.steps * q // 100, t.steps - 1) if q == 100 else t.steps * q // 100)
            for q in (25, 50, 75, 100)]
    return [(name, step, lr_for(cfg, step)) for name, step in pts]


def describe_plan(cfg: Config, model: nn.Module, train: DataSplit, val: DataSplit,
                  world: int, micro: int) -> str:
    t = cfg.train
    params = sum(p.numel() for p in model.parameters())
    images = t.steps * t.batch_size
    lines = [
        "plan (dry run: recipe and data checked, nothing trained)",
        f"  model         {cfg.model.name}: {params:,} parameters, {cfg.model.num_classes} classes",
        f"  data          {len(train):,} train / {len(val):,} val images in {train.num_classes} classes "
        f"({len(train.excluded) + len(val.excluded)} excluded), {cfg.data.format}, "
        f"{cfg.data.loader} loader",
        f"  batch         {t.batch_size} images per step = {world} rank(s) x {t.accum_steps} "
        f"accumulation x {micro} per forward pass; precision {t.precision}",
        f"  steps         {t.steps:,} optimizer steps = {images / len(train):,.2f} epochs, "
        f"{images:,} images seen",
        *[f"  {'learning rate' if i == 0 else '':<13} step {s:>11,}  {lr:<12.6g} {n}"
          for i, (n, s, lr) in enumerate(lr_points(cfg))],
        f"  eval          every {cfg.eval.every_steps or 'end-only'} steps at {cfg.eval.img_size} px, "
        f"crop {cfg.eval.crop_pct}",
        f"  checkpoints   every {cfg.checkpoint.every_steps or 'end-only'} steps, keep {cfg.checkpoint.keep_last}, "
        f"about {checkpoint_bytes(model, cfg.ema.enabled) / 2**20:,.0f} MiB each "
        f"(model + momentum{' + EMA' if cfg.ema.enabled else ''})",
        f"  output        {cfg.run.dir}",
    ]
    return "\n".join(lines)
