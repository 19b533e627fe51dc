"""Stage 1 of a training run (setup): every `auto` and derived value of a recipe, resolved once.

The config `resolve` returns is the single truth of a run: it is what the run prints, saves as
config.yaml and checkpoints, and what every later stage reads. No resolved value travels beside
it, and no other module computes one: the benchmarks resolve their configs here too (without a
dataset, with the class count given). Resolved here:
  run.device          auto -> cuda or cpu (the device distributed.init picked for this rank)
  data.loader         auto -> dali where DALI imports and can use the device, else torch
  data.format         auto -> shards or folder: the format cspx.data.build found in data.root
  train.precision     auto -> bf16 / fp16 on GPUs, fp32 on CPUs (cspx.precision)
  model.num_classes   null -> the training set's class count
  eval.img_size, eval.crop_pct, eval.interpolation   null -> the model's evaluation protocol
                      (cspx.models.eval_protocol)
It also checks, once for the whole run, that the data suits the config (`check_fits`).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from cspx import precision
from cspx.config import Config, micro_batch, with_updates
from cspx.data.loader import DataSplit, check_fits
from cspx.distributed import DistEnv
from cspx.errors import CspxError
from cspx.models import eval_protocol
from cspx.schedule import lr_for

log = logging.getLogger("cspx")


def resolve_loader(pref: str, device: torch.device) -> str:
    """'auto' -> 'dali' when DALI imports (and can use the device), else 'torch' with a notice;
    an explicit 'dali' that cannot run is an error, never a silent fallback."""
    if pref == "torch":
        return "torch"
    from cspx.data.dali_loader import dali_available
    ok, reason = dali_available(device)
    if ok:
        return "dali"
    if pref == "dali":
        raise CspxError(f"data.loader: dali is not available ({reason})")
    log.info(f"data loader: torch (DALI not available: {reason})")
    return "torch"


def resolve(cfg: Config, env: DistEnv, data: Optional[Tuple[DataSplit, DataSplit]] = None, *,
            num_classes: Optional[int] = None) -> Config:
    """The config with every auto/null value above filled in, after checking that the data
    suits it (class count, at least one batch per rank).

    data: the run's (train, val) splits. Without them (a benchmark on generated batches) the
    class count is model.num_classes, else `num_classes`; data.format stays as given, and no
    split is checked."""
    if data is not None:
        train, val = data
        classes = cfg.model.num_classes or train.num_classes
        if classes < train.num_classes:
            raise CspxError(f"model.num_classes: {classes} is less than the dataset's "
                            f"{train.num_classes} classes")
        fmt = train.format
    else:
        given = cfg.model.num_classes or num_classes
        if not given:
            raise ValueError("resolve: without data, model.num_classes or num_classes must be "
                             "given")
        classes, fmt = given, cfg.data.format
    e = cfg.eval
    protocol = eval_protocol(cfg.model.name, img_size=e.img_size, crop_pct=e.crop_pct,
                             interpolation=e.interpolation)
    cfg = with_updates(
        cfg, run={"device": env.device.type},
        data={"loader": resolve_loader(cfg.data.loader, env.device), "format": fmt},
        train={"precision": precision.resolve(cfg.train.precision, env.device)},
        model={"num_classes": classes},
        eval={"img_size": protocol.img_size, "crop_pct": protocol.crop_pct,
              "interpolation": protocol.interpolation})
    if data is not None:
        check_fits("training", len(train), micro_batch(cfg, env.world), env.world, partial=False)
        check_fits("validation", len(val), cfg.eval.batch_size, env.world, partial=True)
    t, s = cfg.train, cfg.sched
    for key, n, what in (("burn_in", s.burn_in, "burn-in"), ("warmup_steps", s.warmup_steps,
                                                               "the warmup")):
        if n >= t.steps and env.is_main:
            log.warning(f"sched.{key}={n} >= train.steps={t.steps}: the run ends inside {what} "
                        f"(its last step has LR {lr_for(cfg, t.steps - 1):.4g} of "
                        f"optim.lr={cfg.optim.lr:g})")
    return cfg
