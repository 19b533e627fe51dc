"""A training run from start to finish (stage 1, setup, and stage 3, finish): the phases that turn
a recipe into a running `Trainer` and report its result. train.py calls `train()`.

`_run` reads as the sheet of a run: environment, data, resolved config, model, run folder,
checkpointer and resume point, run files, loaders, trainer, loop, finish. One ExitStack owns
everything a run opens (run-folder lock, checkpointer, loaders, metrics) and closes it, in
reverse order, however the run ends.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from contextlib import ExitStack
from typing import Any, Dict, Optional, Tuple

import torch

from cspx import configio, distributed, precision, watchdog
from cspx.checkpoint import Checkpointer
from cspx.config import Config, micro_batch, resolved
from cspx.data.build import build_splits, build_train_loader, classes_file, eval_loader_for
from cspx.data.loader import DataSplit
from cspx.distributed import DistEnv
from cspx.errors import CspxError, RunFailure
from cspx.files import atomic_write, write_json
from cspx.models import convert_sync_batchnorm, create_model
from cspx.optim import build_optimizer
from cspx.placement import place_model
from cspx.plan import describe_plan
from cspx.resolve import resolve
from cspx.rng import seed_all
from cspx.run_dir import RunDir
from cspx.runlog import (
    MetricsLog,
    attach_log_file,
    format_provenance,
    provenance,
    setup_console,
    to_log_files,
)
from cspx.train_loop import OOM, Trainer
from cspx.weights import load_into

log = logging.getLogger("cspx")


def train(cfg: Config, resume: Optional[str] = None, force: bool = False, dry_run: bool = False,
          verbose: bool = False) -> int:
    env = distributed.init(cfg.run.device)
    # from here to the end: the stall watchdog (run.stall_timeout) and, under torchrun, the end
    # of a rank whose agent died (cspx.watchdog)
    watchdog.start(cfg.run.stall_timeout, env.rank, env.world, cover_compile=cfg.model.compile)
    try:
        with ExitStack() as stack:
            return _run(cfg, env, resume, force, dry_run, verbose, stack)
    except OOM:
        raise CspxError(f"out of memory on {env.device} with micro-batch "
                        f"{micro_batch(cfg, env.world)}; raise train.accum_steps "
                        f"(e.g. train.accum_steps={cfg.train.accum_steps * 2}) to halve the images "
                        f"per forward pass at the same batch") from None
    except RunFailure as e:  # a diverged run, failed saves: the one line goes into train.log too
        to_log_files(f"error: {e}")
        raise
    finally:
        distributed.destroy()
        watchdog.stop()


def _run(cfg: Config, env: DistEnv, resume: Optional[str], force: bool, dry_run: bool,
         verbose: bool, stack: ExitStack) -> int:
    prov = _environment(cfg, env, verbose, keep_log=not dry_run)
    data = build_splits(cfg, env)
    cfg = resolve(cfg, env, data)
    log.info("resolved config:\n" + configio.dump_yaml(cfg))
    seed_all(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name,
                         num_classes=resolved(cfg.model.num_classes, "model.num_classes"),
                         drop_path_rate=cfg.model.drop_path_rate)
    if dry_run:
        print(describe_plan(cfg, model, *data, env.world, micro_batch(cfg, env.world)), flush=True)
        return 0
    run = _claim_run_dir(cfg, env, stack)
    ckpt = Checkpointer(run_dir=run.path, cfg=cfg.checkpoint, env=env,
                        meta=_meta(cfg, data, prov, run))
    stack.callback(ckpt.close)
    state = ckpt.resume_state(resume)
    same_world = True
    if state is not None:
        same_world = ckpt.check_compat(state, config=configio.to_dict(cfg),
                                       fingerprint=data[0].fingerprint(), force=force)
    _write_run_files(run, cfg, prov, env)
    model, optimizer = _place_model(cfg, env, model, fresh=state is None)
    train_loader, eval_loader = _loaders(cfg, data, env, run, stack)
    metrics = MetricsLog(run_dir=run.path,
                         resume_step=state["progress"]["step"] if state else None,
                         tensorboard=cfg.run.tensorboard, enabled=env.is_main)
    stack.callback(metrics.close)
    trainer = Trainer(cfg=cfg, env=env, model=model, optimizer=optimizer,
                      train_loader=train_loader, eval_loader=eval_loader, metrics=metrics,
                      ckpt=ckpt)
    if state is not None:
        trainer.restore(state, same_world=same_world, force=force)
        del state
    else:
        seed_all(cfg.seed + 1 + env.rank)  # stochastic layers differ across ranks
    trainer.wrap()
    epochs = cfg.train.steps * cfg.train.batch_size / len(data[0])
    log.info(f"training {cfg.model.name} for {cfg.train.steps} steps ({epochs:.2f} epochs) of "
             f"{cfg.train.batch_size} images on {env.world} x {env.device} "
             f"({precision.of(cfg)}, {cfg.data.loader} loader)")
    finished = trainer.fit()
    return _finish(cfg, env, run, trainer, finished)


# ----- the phases ---------------------------------------------------------------------------------
def _environment(cfg: Config, env: DistEnv, verbose: bool, keep_log: bool) -> Dict[str, Any]:
    """Console logging, the provenance header (versions, commit, device), kernel settings."""
    setup_console(env.is_main, verbose, keep=keep_log)
    prov = provenance(env.device, env.world)
    log.info("cspx training run\n" + format_provenance(prov))
    precision.configure_backends(env.device, deterministic=cfg.train.deterministic)
    return prov


def _claim_run_dir(cfg: Config, env: DistEnv, stack: ExitStack) -> RunDir:
    """Rank 0 claims run.dir and takes its lock before anything is written there; if it cannot,
    every rank stops with its one-line reason."""
    run = RunDir(cfg.run.dir)

    def claim() -> None:
        run.claim()
        run.lock()
        stack.callback(run.release)

    distributed.main_first(claim, env, "claiming run.dir")
    return run


def _meta(cfg: Config, data: Tuple[DataSplit, DataSplit], prov: Dict[str, Any],
          run: RunDir) -> Dict[str, Any]:
    """What every checkpoint records about the run besides its state. `val_split`: the split
    held out of the training images (data.val_split), which validate.py evaluates by default."""
    train, val = data
    held = None
    if cfg.data.val_split is not None:
        held = {"fraction": cfg.data.val_split, "seed": cfg.seed, "images": len(val),
                "fingerprint": val.fingerprint()}
    return {"config": configio.to_dict(cfg), "config_hash": configio.config_hash(cfg),
            "data_fingerprint": train.fingerprint(), "model_name": cfg.model.name,
            "num_classes": cfg.model.num_classes, "classes": train.classes, "val_split": held,
            "cspx_version": prov["cspx"], "git_commit": prov["commit"], "run_id": run.run_id}


def _write_run_files(run: RunDir, cfg: Config, prov: Dict[str, Any], env: DistEnv) -> None:
    """train.log, config.yaml (the resolved config) and provenance.json, after the resume
    checks, so a refused start leaves an earlier run's files alone."""
    if env.is_main:
        attach_log_file(run.file("train.log"))
        atomic_write(run.file("config.yaml"), configio.dump_yaml(cfg))
        write_json(run.file("provenance.json"), prov)


def _place_model(cfg: Config, env: DistEnv, model: torch.nn.Module, fresh: bool):
    """Initial weights (model.init_from, fresh runs only), SyncBN, device and memory format
    (cspx.placement; the trainer compiles it later), and the optimizer over the placed
    parameters."""
    if fresh and cfg.model.init_from:
        info = load_into(model, cfg.model.init_from, drop_classifier_if_mismatch=True)
        log.info(f"initialised from {cfg.model.init_from} ({info})")
    if cfg.model.sync_bn and env.distributed:
        model = convert_sync_batchnorm(model)
    place_model(model, device=env.device, channels_last=cfg.model.channels_last)
    return model, build_optimizer(model, cfg.optim, env.device,
                                  skips=cfg.train.on_nonfinite == "skip")


def _loaders(cfg: Config, data: Tuple[DataSplit, DataSplit], env: DistEnv, run: RunDir,
             stack: ExitStack):
    work_dir = run.file("index")  # DALI's file lists
    os.makedirs(work_dir, exist_ok=True)
    train_loader = build_train_loader(cfg, data[0], env, work_dir)
    stack.callback(train_loader.close)
    eval_loader = eval_loader_for(cfg, data[1], env, work_dir)
    stack.callback(eval_loader.close)
    return train_loader, eval_loader


def _finish(cfg: Config, env: DistEnv, run: RunDir, trainer: Trainer, finished: bool) -> int:
    p = trainer.progress
    if not finished:
        log.info(f"checkpoint saved at step {p.step}; resume with:\n  {resume_command(env)}")
    elif env.is_main:
        log.info(f"done: {p.step} steps, best top-1 {p.best_top1:.2f}% at step {p.best_step}.\n"
                 f"evaluate the result with:\n  {validate_command(cfg, run)}")
    return 0


def resume_command(env: DistEnv) -> str:
    """This process's command line with `--resume auto` (under torchrun when distributed)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume=") or a == "--resume-force":
            continue
        argv.append(a)
    prog = os.path.relpath(sys.argv[0]) if sys.argv[0].endswith(".py") else "cspx-train"
    launcher = "python" if prog.endswith(".py") else ""
    if env.distributed:
        nodes = env.world // env.local_world
        launcher = f"torchrun --nproc_per_node={env.local_world}" + (
            f" --nnodes={nodes} <same rendezvous options>" if nodes > 1 else "")
    return " ".join(x for x in [launcher, prog, *map(shlex.quote, argv), "--resume auto"] if x)


def validate_command(cfg: Config, run: RunDir) -> str:
    """The validate.py command that reproduces the run's final evaluation (same images, loader,
    resize, precision, layout and batch: the same top-1, top-5 and count)."""
    e, d = cfg.eval, cfg.data
    exe = sys.executable
    python = os.path.relpath(exe) if exe.startswith(os.getcwd() + os.sep) else exe
    args = ["--checkpoint", os.path.join(run.path, "checkpoints", "last.pt"),
            "--data-dir", os.path.abspath(os.path.expanduser(d.root)),
            "--loader", d.loader, "--img-size", str(resolved(e.img_size, "eval.img_size")),
            "--crop-pct", str(resolved(e.crop_pct, "eval.crop_pct")),
            "--interpolation", resolved(e.interpolation, "eval.interpolation"),
            "--batch-size", str(e.batch_size),
            "--precision", precision.of(cfg), "--device", cfg.run.device,
            "--workers", str(d.workers)]
    if cfg.model.channels_last:
        args.append("--channels-last")
    if classes_file(cfg):
        args += ["--classes", classes_file(cfg)]
    if d.exclude:
        args += ["--exclude", os.path.expanduser(d.exclude)]
    if d.format == "shards":
        args += ["--bad-shards", d.bad_shards]
    if d.val_split is not None:
        args += ["--val-split", repr(d.val_split), "--seed", str(cfg.seed)]
    return " ".join(shlex.quote(a) for a in [python, "validate.py", *args])
