"""Benchmarks (scripts/benchmark.py) of training steps: `model`, `overhead`, `train` (with
`baseline` in the same run)."""
from __future__ import annotations

import itertools
import tempfile
from argparse import Namespace
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, RandomSampler
from torchvision.datasets import ImageFolder

from cspx import precision
from cspx.bench.common import alternate, median, seconds
from cspx.bench.fixed import FixedBatchLoader
from cspx.checkpoint import Checkpointer
from cspx.config import Config, load_config, with_updates
from cspx.data.build import build_train_loader
from cspx.data.index import build_index
from cspx.data.transforms import IMAGENET_MEAN, IMAGENET_STD, INTERP, RA_BINS, ra_magnitude_bin
from cspx.distributed import DistEnv
from cspx.models import create_model
from cspx.optim import build_sgd, lr_for, set_lr
from cspx.resolve import resolve_loader
from cspx.runlog import MetricsLog
from cspx.train_loop import Trainer

# keys a benchmark overrides so the trainer only trains: no evaluation, checkpoints or events
QUIET = ["eval.every_steps=0", "checkpoint.every_steps=0", "run.tensorboard=false",
         "train.steps=1000000", "sched.burn_in=0"]


def bench_config(args: Namespace, *extra: str) -> Config:
    """The recipe with the benchmark's settings, its auto values resolved as a run would (the
    benchmark has no dataset to resolve the class count from: 1000)."""
    over = [f"model.name={args.model}", f"train.batch_size={args.batch}",
            f"aug.img_size={args.img_size}", f"train.precision={args.precision}",
            f"model.channels_last={str(args.channels_last).lower()}",
            f"data.workers={args.workers}", *QUIET, *args.set, *extra]
    return resolved(load_config(args.recipe, over, check_paths=False), device_of(args))


def resolved(cfg: Config, device: torch.device) -> Config:
    """cspx.resolve's device, loader and precision for a run without a dataset (1000 classes)."""
    return with_updates(cfg, run={"device": device.type}, model={"num_classes": 1000},
                        data={"loader": resolve_loader(cfg.data.loader, device)},
                        train={"precision": precision.resolve(cfg.train.precision, device)})


def device_of(args: Namespace) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def make_trainer(cfg: Config, device: torch.device, loader, work_dir: str) -> Trainer:
    """The real Trainer on `loader` (a bench_config), writing nothing but into `work_dir`."""
    precision.configure_backends(device, deterministic=cfg.train.deterministic)
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = create_model(cfg.model.name, num_classes=1000).to(device, memory_format=fmt)
    opt = build_sgd(model, cfg.optim, device)
    env = DistEnv(device=device)
    t = Trainer(cfg, env, model, opt, loader, [], MetricsLog(work_dir, None, False, enabled=False),
                Checkpointer(work_dir, cfg.checkpoint, env))
    t.wrap()
    return t


def trainer_runner(t: Trainer, steps: int, device: torch.device) -> Callable[[], float]:
    """Seconds per optimizer step of Trainer.fit over `steps` steps (the whole loop: LR, logging
    at run.log_every_steps, stop vote, EMA if enabled)."""
    return lambda: seconds(lambda: t.fit(until=t.progress.step + steps), device) / steps


def bare_runner(cfg: Config, batches, device: torch.device, steps: int) -> Callable[[], float]:
    """The peer: a plain loop of forward, backward and optimizer.step, with the trainer's own
    optimizer (cspx.optim.build_sgd: the same parameter groups and foreach / fused kernels) and
    LR schedule, so only the loop around them differs."""
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = create_model(cfg.model.name, num_classes=1000).to(device, memory_format=fmt).train()
    opt = build_sgd(model, cfg.optim, device)
    name = precision.of(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.uses_loss_scaling(name))
    it = iter(batches)
    step = [0]

    def run():
        for _ in range(steps):
            x, y = next(it)
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            set_lr(opt, lr_for(cfg, step[0]))
            with precision.autocast(name, device):
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.train.label_smoothing)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step[0] += 1
    return lambda: seconds(run, device) / steps


def overhead(args: Namespace) -> Tuple[List[Dict], Dict]:
    device = device_of(args)
    cfg = bench_config(args)
    fixed = FixedBatchLoader.random(args.batch, args.img_size, 1000, device, args.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, device, fixed, tmp)
        runs = {"cspx trainer": trainer_runner(trainer, args.steps, device),
                "bare loop": bare_runner(cfg, itertools.repeat((fixed.images, fixed.labels)),
                                         device, args.steps)}
        for fn in runs.values():
            fn()  # warm-up: allocator, kernels, compile
        res = alternate(runs, args.rounds)
    t, b = median(res["cspx trainer"]), median(res["bare loop"])
    rows = [{"loop": k, "s/step (median)": median(v), "img/s": args.batch / median(v),
             "rounds": len(v)} for k, v in res.items()]
    return rows, {"overhead_pct": 100 * (t / b - 1), "raw": res}


def _baseline_loader(folder: str, cfg: Config, device: torch.device):
    """What timm's and torchvision's reference scripts do: ImageFolder + PIL transforms +
    DataLoader (pinned, N workers), the same augmentations as the recipe."""
    a = cfg.aug
    tf = [T.RandomResizedCrop(a.img_size, scale=a.scale, ratio=a.ratio,
                              interpolation=INTERP[a.interpolation]), T.RandomHorizontalFlip(a.hflip)]
    if a.randaugment_ops:
        tf.append(T.RandAugment(a.randaugment_ops, ra_magnitude_bin(a.randaugment_magnitude), RA_BINS,
                                INTERP[a.randaugment_interpolation]))
    tf += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    w = cfg.data.workers
    data = ImageFolder(folder, T.Compose(tf))
    # one iterator for the whole benchmark: a sampler that runs epoch after epoch (RandomSampler
    # draws a fresh permutation per pass over the data), so the workers are never re-spawned and
    # their prefetch never drains at an epoch boundary, as a careful user would set it up
    sampler = RandomSampler(data, replacement=False, num_samples=len(data) * 10_000)
    dl = DataLoader(data, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=w,
                    pin_memory=device.type == "cuda", drop_last=True, persistent_workers=w > 0,
                    prefetch_factor=4 if w > 0 else None)
    return iter(dl)


def train(args: Namespace) -> Tuple[List[Dict], Dict]:
    """Full training steps with the real loader vs synthetic data vs the plain-PyTorch baseline."""
    device = device_of(args)
    cfg = bench_config(args, f"data.loader={args.loader}")
    kind = cfg.data.loader
    index = build_index(args.data, warn=False)
    fixed = FixedBatchLoader.random(args.batch, args.img_size, 1000, device, args.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        real = build_train_loader(cfg, index, DistEnv(device=device), tmp)
        runs = {f"cspx ({kind} loader)": trainer_runner(make_trainer(cfg, device, real, tmp), args.steps, device),
                "cspx (synthetic)": trainer_runner(make_trainer(cfg, device, fixed, tmp), args.steps, device),
                "baseline (ImageFolder+PIL)": bare_runner(cfg, _baseline_loader(args.data, cfg, device),
                                                          device, args.steps)}
        for fn in runs.values():
            fn()
        res = alternate(runs, args.rounds)
        real.close()
    ips = {k: args.batch / median(v) for k, v in res.items()}
    real_ips, syn_ips, base_ips = ips.values()
    rows = [{"loop": k, "img/s (median)": v, "rounds": args.rounds} for k, v in ips.items()]
    return rows, {"train_over_synthetic": real_ips / syn_ips, "cspx_over_baseline": real_ips / base_ips,
                  "loader": kind, "images": len(index), "raw": res}


def model(args: Namespace) -> Tuple[List[Dict], Dict]:
    """forward + backward + SGD step on device-resident tensors over a grid of settings."""
    device = device_of(args)
    rows = []
    grid = itertools.product(args.batch_sizes, args.precisions, args.channels_last_grid, args.compile_grid)
    for batch, precision, cl, comp in grid:
        if precision == "fp16" and device.type == "cpu":
            continue
        a = Namespace(**{**vars(args), "batch": batch, "precision": precision, "channels_last": cl})
        cfg = bench_config(a, f"model.compile={str(comp).lower()}")
        fixed = FixedBatchLoader.random(batch, args.img_size, 1000, device, cl)
        with tempfile.TemporaryDirectory() as tmp:
            t = make_trainer(cfg, device, fixed, tmp)
            run = trainer_runner(t, args.steps, device)
            run()
            s = median([run() for _ in range(args.rounds)])
        rows.append({"batch": batch, "precision": precision, "channels_last": cl, "compile": comp,
                     "ms/step": 1000 * s, "img/s": batch / s})
    return rows, {}
