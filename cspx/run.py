"""Assemble a training run from a recipe: environment, data, model, resume; then train.

train.py and the `cspx-train` entry point call `train()`; everything here happens once per run.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from typing import Any, Dict, Optional

import torch

from cspx import checkpoint, configio, distributed
from cspx.checkpoint import CheckpointManager
from cspx.config import Config, micro_batch, training_diff, with_updates
from cspx.data.build import (build_eval_loader, build_indices, build_train_loader, fingerprint,
                             resolve_loader)
from cspx.errors import CspxError
from cspx.models import convert_sync_batchnorm, create_model
from cspx.optim import build_sgd
from cspx.plan import describe_plan
from cspx.runlog import MetricsLog, format_provenance, provenance, setup_console
from cspx.trainer import Trainer, seed_all
from cspx.weights import load_into

log = logging.getLogger("cspx")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 on GPUs that have it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def configure_backends(cfg: Config, device: torch.device) -> None:
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 recipes: TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True


def resume_command(env: distributed.DistEnv) -> str:
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
        launcher = f"torchrun --nproc_per_node={env.local_world}" + (f" --nnodes={nodes} <same rendezvous options>" if nodes > 1 else "")
    return " ".join(x for x in [launcher, prog, *map(shlex.quote, argv), "--resume auto"] if x)


def _find_resume(resume: Optional[str], ckpt: CheckpointManager, env) -> Optional[Dict[str, Any]]:
    if resume is None:
        return None
    if resume == "auto":
        found = ckpt.latest_valid() if env.is_main else None
        path = distributed.broadcast_object(found[0] if found else None, env)
        if path is None:
            log.info("no checkpoint to resume from: starting fresh")
            return None
        state = found[1] if env.is_main else checkpoint.load(path)
    else:
        path, state = resume, checkpoint.load(resume)
    log.info(f"resuming from {path} (step {state['progress']['step']})")
    return state


def _check_compat(state: Dict[str, Any], cfg_dict: Dict[str, Any], fp: str, world: int,
                  force: bool) -> bool:
    """Refuse to resume a different experiment unless forced. Returns True if ranks match."""
    old, new = configio.flatten(state["config"]), configio.flatten(cfg_dict)
    problems = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in training_diff(state["config"], cfg_dict)]
    if state.get("data_fingerprint") != fp:
        problems.append("the training set (files or labels) changed")
    if state["world_size"] != world:
        problems.append(f"world size ({state['world_size']} -> {world})")
    if problems and not force:
        raise CspxError("cannot resume exactly, the run differs from its checkpoint in: "
                        + ", ".join(problems) + "; pass --resume-force to continue anyway")
    if problems:
        log.warning("resuming with --resume-force despite: " + ", ".join(problems))
    return state["world_size"] == world


def train(cfg: Config, resume: Optional[str] = None, force: bool = False, dry_run: bool = False,
          verbose: bool = False) -> int:
    env = distributed.init(cfg.run.device)
    try:
        return _train(cfg, env, resume, force, dry_run, verbose)
    except OOM:
        raise CspxError(f"out of memory on {env.device} with micro-batch {micro_batch(cfg, env.world)}; "
                        f"raise train.accum_steps (e.g. train.accum_steps={cfg.train.accum_steps * 2}) "
                        f"to halve the images per forward pass at the same batch") from None
    finally:
        distributed.destroy()


def _train(cfg: Config, env: distributed.DistEnv, resume, force, dry_run, verbose) -> int:
    run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
    setup_console(None if dry_run else run_dir, env.is_main, verbose)
    prov = provenance(env.device, env.world)
    log.info("cspx training run\n" + format_provenance(prov))
    configure_backends(cfg, env.device)
    kind = resolve_loader(cfg.data.loader, env.device)
    precision = resolve_precision(cfg.train.precision, env.device)
    train_index, val_index = build_indices(cfg, env)
    num_classes = cfg.model.num_classes or train_index.num_classes
    if num_classes < train_index.num_classes:
        raise CspxError(f"model.num_classes: {num_classes} is less than the dataset's "
                        f"{train_index.num_classes} classes")
    cfg = with_updates(cfg, data={"loader": kind}, train={"precision": precision},
                       model={"num_classes": num_classes})
    mb = micro_batch(cfg, env.world)
    log.info("resolved config:\n" + configio.dump_yaml(cfg))
    seed_all(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=num_classes,
                         drop_path_rate=cfg.model.drop_path_rate)
    if dry_run:
        print(describe_plan(cfg, model, train_index, val_index, env.world, mb), flush=True)
        return 0
    cfg_dict = configio.to_dict(cfg)
    fp = fingerprint(train_index)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, env.is_main)
    state = _find_resume(resume, ckpt, env)
    if state is None and ckpt.step_files():  # never start over on top of another run
        newest = max(ckpt.step_files())[0]
        raise CspxError(f"run.dir: {run_dir} already holds checkpoints (newest: step {newest}); "
                        f"pass --resume auto to continue that run, or set run.dir to a new folder")
    same_world = _check_compat(state, cfg_dict, fp, env.world, force) if state else True
    if env.is_main:  # after the checks, so a refused start leaves the old run's files alone
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(configio.dump_yaml(cfg))
        with open(os.path.join(run_dir, "provenance.json"), "w") as f:
            json.dump(prov, f, indent=2)

    if state is None and cfg.model.init_from:
        info = load_into(model, cfg.model.init_from, drop_classifier_if_mismatch=True)
        log.info(f"initialised from {cfg.model.init_from} ({info})")
    if cfg.model.sync_bn and env.distributed:
        model = convert_sync_batchnorm(model)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(env.device, memory_format=fmt)
    optimizer = build_sgd(model, cfg.optim, env.device)
    work_dir = os.path.join(run_dir, "index")
    os.makedirs(work_dir, exist_ok=True)
    train_loader = build_train_loader(kind, cfg, train_index, env, mb, precision, work_dir)
    e = cfg.eval
    eval_loader = build_eval_loader(kind, val_index, e.img_size, e.crop_pct, e.interpolation,
                                    e.batch_size, env, cfg.data.workers, cfg.model.channels_last)
    # a fresh start drops the events of an earlier attempt that died before its first checkpoint
    step = state["progress"]["step"] if state else 0
    metrics = MetricsLog(run_dir, step, cfg.run.tensorboard, env.is_main)
    extra = {"config": cfg_dict, "config_hash": configio.config_hash(cfg), "data_fingerprint": fp,
             "model_name": cfg.model.name, "num_classes": num_classes, "classes": train_index.classes,
             "cspx_version": prov["cspx"], "git_commit": prov["commit"]}
    trainer = Trainer(cfg, env, model, optimizer, train_loader, eval_loader, precision, metrics,
                      ckpt, extra)
    if state is not None:
        trainer.load_state_dict(state, restore_ranks=same_world)
        if not same_world and train_loader.kind == "torch":  # rank-independent position
            train_loader.load_state_dict(state["ranks"][0]["loader"])
        del state
    else:
        seed_all(cfg.seed + 1 + env.rank)  # stochastic layers differ across ranks
    trainer.wrap()
    epochs = cfg.train.steps * cfg.train.batch_size / len(train_index)
    log.info(f"training {cfg.model.name} for {cfg.train.steps} steps ({epochs:.2f} epochs) of "
             f"{cfg.train.batch_size} images on {env.world} x {env.device} ({precision}, {kind} loader)")
    try:
        finished = trainer.fit()
    finally:
        metrics.close()
        train_loader.close()
    if not finished:
        log.info(f"checkpoint saved at step {trainer.progress.step}; resume with:\n  {resume_command(env)}")
        return 0
    if env.is_main:
        _print_validate_hint(cfg, run_dir, trainer)
    return 0


def _print_validate_hint(cfg: Config, run_dir: str, trainer: Trainer) -> None:
    p = trainer.progress
    root = os.path.expanduser(cfg.data.root)
    classes = cfg.data.classes or (os.path.join(root, "synsets.txt") if cfg.data.synthetic else None)
    e = cfg.eval
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    cmd = (f"{python} validate.py --checkpoint {os.path.join(run_dir, 'checkpoints', 'last.pt')} "
           f"--data-dir {os.path.join(root, 'val')}"
           + (f" --classes {os.path.expanduser(classes)}" if classes else "")
           + (f" --img-size {e.img_size}" if e.img_size != 224 else "")
           + (f" --crop-pct {e.crop_pct}" if e.crop_pct != 0.875 else ""))
    log.info(f"done: {p.step} steps, best top-1 {p.best_top1:.2f}% at step {p.best_step}.\n"
             f"evaluate the result with:\n  {cmd}")
