"""Benchmarks (scripts/benchmark.py) of training steps: `model`, `overhead`, `train` (with
`baseline` in the same run).

Variants. `model` and `train` measure every combination of --batch-sizes and --compile-modes in
one run: `eager`, or a torch.compile mode (`default`; `reduce-overhead`, which adds CUDA graphs;
`max-autotune`, ...; the recipe key model.compile_mode). Each row reports img/s, achieved
TFLOP/s (3 x the forward FLOPs of cspx.bench.flops per image: the backward pass costs about twice
the forward), peak memory (common.peak_mib) and `warm-up s`: seconds from the first call to the
end of the --warmup steps; for a compiled variant that is its compile time. A variant that fails
(out of memory, a compiler error) becomes a row with an `error` and the others still run.
"""
from __future__ import annotations

import gc
import itertools
import tempfile
from argparse import Namespace
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, RandomSampler
from torchvision.datasets import ImageFolder

from cspx import precision
from cspx.bench.common import alternate, median, peak_kind, peak_mib, reset_peak, seconds
from cspx.bench.fixed import FixedBatchLoader
from cspx.bench.flops import conv_outputs, forward_flops
from cspx.checkpoint import Checkpointer
from cspx.config import Config, load_config, micro_batch, resolved
from cspx.data.build import build_train_loader
from cspx.data.index import build_index
from cspx.data.loader import check_fits
from cspx.data.transforms import IMAGENET_MEAN, IMAGENET_STD, INTERP, RA_BINS, ra_magnitude_bin
from cspx.distributed import DistEnv
from cspx.models import create_model
from cspx.optim import build_optimizer, set_lr
from cspx.placement import memory_format, place_model
from cspx.resolve import resolve
from cspx.runlog import MetricsLog
from cspx.schedule import lr_for
from cspx.train_loop import Trainer

# keys a benchmark overrides so the trainer only trains: no evaluation, checkpoints or events
QUIET = ["eval.every_steps=0", "checkpoint.every_steps=0", "run.tensorboard=false",
         "train.steps=1000000", "sched.burn_in=0"]
EAGER = "eager"  # --compile-modes name for no torch.compile
BENCH_CLASSES = 1000  # ImageNet's: the classifier a benchmark's model has
Runner = Callable[[int], float]  # runner(n): seconds per step over n steps


def bench_config(args: Namespace, *extra: str) -> Config:
    """The recipe with the benchmark's settings, resolved by cspx.resolve as a run's is (the
    benchmark has no dataset to take the class count from: model.num_classes, else 1000)."""
    over = [f"model.name={args.model}", f"train.batch_size={args.batch}",
            f"aug.img_size={args.img_size}", f"train.precision={args.precision}",
            f"model.channels_last={str(args.channels_last).lower()}",
            f"data.workers={args.workers}", *QUIET, *args.set, *extra]
    return resolve(load_config(args.recipe, over, check_paths=False),
                   DistEnv(device=device_of(args)), num_classes=BENCH_CLASSES)


def compile_keys(mode: str) -> List[str]:
    """Recipe overrides for one --compile-modes entry."""
    if mode == EAGER:
        return ["model.compile=false"]
    return ["model.compile=true", f"model.compile_mode={mode}"]


def device_of(args: Namespace) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


# modes that train on synthetic data only: no loader to resolve (and no DALI to import)
SYNTHETIC_ONLY = "data.loader=torch"


def synthetic(cfg: Config, device: torch.device) -> FixedBatchLoader:
    """A fixed random batch as the run's loader would hand it over: same shape, layout and
    dtype (precision.loader_dtype), so a compiled model sees the same input either way."""
    return FixedBatchLoader.random(batch=cfg.train.batch_size, img_size=cfg.aug.img_size,
                                   num_classes=resolved(cfg.model.num_classes, "model.num_classes"),
                                   device=device,
                                   channels_last=cfg.model.channels_last,
                                   dtype=precision.loader_dtype(precision.of(cfg), device))


def make_trainer(cfg: Config, device: torch.device, loader, work_dir: str,
                 compile_backend: str = "inductor") -> Trainer:
    """The real Trainer on `loader` (a bench_config), writing nothing but into `work_dir`."""
    precision.configure_backends(device, deterministic=cfg.train.deterministic)
    torch.manual_seed(cfg.seed)
    classes = resolved(cfg.model.num_classes, "model.num_classes")
    model = create_model(cfg.model.name, num_classes=classes)
    place_model(model, device=device, channels_last=cfg.model.channels_last)
    opt = build_optimizer(model, cfg.optim, device, skips=cfg.train.on_nonfinite == "skip")
    env = DistEnv(device=device)
    t = Trainer(cfg=cfg, env=env, model=model, optimizer=opt, train_loader=loader,
                eval_loader=None,
                metrics=MetricsLog(run_dir=work_dir, resume_step=None, tensorboard=False,
                                   enabled=False),
                ckpt=Checkpointer(run_dir=work_dir, cfg=cfg.checkpoint, env=env))
    t.wrap(compile_backend)
    return t


def trainer_runner(t: Trainer, device: torch.device, loader=None) -> Runner:
    """Seconds per optimizer step of Trainer.fit over n steps (the whole loop: LR, logging at
    run.log_every_steps, stop vote, EMA if enabled), on `loader` when given: contenders that
    share one trainer (real and synthetic data) share its model and its compiled code. (The
    loader registered with the trainer's checkpointer stays the first one; a benchmark writes
    no checkpoint: QUIET.)"""
    def run(n: int) -> float:
        if n <= 0:  # fit(until=step) would train to train.steps
            return 0.0
        if loader is not None:
            t.loader = loader
        return seconds(lambda: t.fit(until=t.progress.step + n), device) / n
    return run


class BareLoop:
    """The peer: a plain loop of forward, backward and optimizer.step, with the trainer's own
    optimizer (cspx.optim.build_optimizer: the same parameter groups and foreach / fused
    kernels), LR schedule and GradScaler, so only the loop around them differs."""

    def __init__(self, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.seed)
        self.cfg, self.device, self.step = cfg, device, 0
        self.fmt = memory_format(cfg.model.channels_last)  # the batches', as the model's
        self.model = create_model(cfg.model.name,
                                  num_classes=resolved(cfg.model.num_classes, "model.num_classes"))
        place_model(self.model, device=device, channels_last=cfg.model.channels_last)
        self.model.train()
        self.opt = build_optimizer(self.model, cfg.optim, device)
        self.precision = precision.of(cfg)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=precision.uses_loss_scaling(self.precision))

    def runner(self, batches: Iterable) -> Runner:
        it = iter(batches)
        return lambda n: seconds(lambda: self._steps(it, n), self.device) / n if n > 0 else 0.0

    def _steps(self, it, n: int) -> None:
        cfg, dev = self.cfg, self.device
        for _ in range(n):
            x, y = next(it)
            x = x.to(dev, non_blocking=True).contiguous(memory_format=self.fmt)
            y = y.to(dev, non_blocking=True)
            set_lr(self.opt, lr_for(cfg, self.step))
            with precision.autocast(self.precision, dev):
                loss = F.cross_entropy(self.model(x), y, label_smoothing=cfg.train.label_smoothing)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1


def fresh_start(device: torch.device) -> None:
    """Between variants: forget compiled code (a new variant compiles afresh, so its warm-up is
    its compile time), free what the last variant left, restart the peak-memory count."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _flops_per_image(model: torch.nn.Module, img_size: int, cache: Dict) -> float:
    key = (type(model).__name__, sum(p.numel() for p in model.parameters()), img_size)
    if key not in cache:
        cache[key] = 3.0 * forward_flops(model, img_size)  # forward + backward (about 2x)
    return cache[key]


def overhead(args: Namespace) -> Tuple[List[Dict], Dict]:
    device = device_of(args)
    cfg = bench_config(args, SYNTHETIC_ONLY)
    fixed = synthetic(cfg, device)
    rows: Dict[str, Dict] = {}

    def update(res):
        for k, v in res.items():
            row = rows.get(k) or args.report.row({"loop": k})
            rows[k] = row
            row.update({"s/step (median)": median(v), "img/s": args.batch / median(v),
                        "rounds": len(v)})
        args.report.flush()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, device, fixed, tmp, args.compile_backend)
        bare = BareLoop(cfg, device)
        runs = {"cspx trainer": trainer_runner(trainer, device),
                "bare loop": bare.runner(itertools.repeat((fixed.images, fixed.labels)))}
        for fn in runs.values():
            fn(args.warmup)  # allocator, kernels, cuDNN autotuning, compile
        res = alternate({k: partial(fn, args.steps) for k, fn in runs.items()}, args.rounds,
                        update)
    t, b = median(res["cspx trainer"]), median(res["bare loop"])
    return list(rows.values()), {"overhead_pct": 100 * (t / b - 1), "raw": res}


def baseline_loader(folder: str, cfg: Config, device: torch.device):
    """What timm's and torchvision's reference scripts do: ImageFolder + PIL transforms +
    DataLoader (pinned, N workers), the same augmentations as the recipe."""
    a = cfg.aug
    tf = [T.RandomResizedCrop(a.img_size, scale=a.scale, ratio=a.ratio,
                              interpolation=INTERP[a.interpolation]),
          T.RandomHorizontalFlip(a.hflip)]
    if a.randaugment_ops:
        tf.append(T.RandAugment(a.randaugment_ops, ra_magnitude_bin(a.randaugment_magnitude),
                                RA_BINS, INTERP[a.randaugment_interpolation]))
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
    """Full training steps with the real loader vs synthetic data (the same trainer, model and
    compiled code) vs the plain-PyTorch baseline, per batch size and compile mode."""
    device = device_of(args)
    split = build_index(args.data, warn=False)
    flops: Dict = {}
    out: List[Dict] = []
    for batch in args.batch_sizes:
        a = Namespace(**{**vars(args), "batch": batch})
        fresh_start(device)
        with tempfile.TemporaryDirectory() as tmp:
            c: Dict[str, Dict] = {}  # contender key -> {"run", "row", "flop", "group"}
            loaders = []
            try:
                for mode in args.compile_modes:
                    cfg = bench_config(a, f"data.loader={args.loader}", *compile_keys(mode))
                    # the check a run makes in cspx.resolve: one batch fits in --data
                    check_fits("training", len(split), micro_batch(cfg, 1), 1, partial=False)
                    real = build_train_loader(cfg, split, DistEnv(device=device), tmp)
                    loaders.append(real)
                    t = make_trainer(cfg, device, real, tmp, args.compile_backend)
                    flop = _flops_per_image(t.model, args.img_size, flops)
                    # synthetic first: its warm-up is the compile, apart from the loader's start
                    for name, ld in (("cspx synthetic", synthetic(cfg, device)),
                                     (f"cspx {cfg.data.loader} loader", real)):
                        c[f"{name} b{batch} {mode}"] = dict(
                            run=trainer_runner(t, device, ld), flop=flop, group=mode,
                            row={"loop": name, "batch": batch, "compile": mode})
                if args.baseline:
                    cfg = bench_config(a, SYNTHETIC_ONLY, *compile_keys(EAGER))
                    bare = BareLoop(cfg, device)
                    c[f"baseline b{batch}"] = dict(
                        run=bare.runner(baseline_loader(args.data, cfg, device)),
                        flop=_flops_per_image(bare.model, args.img_size, flops), group="baseline",
                        row={"loop": "baseline (ImageFolder+PIL)", "batch": batch,
                             "compile": EAGER})
                out += measure(args, device, batch, c)
            finally:
                for ld in loaders:
                    ld.close()
    return out, {"peak_memory": peak_kind(device)}


def measure(args: Namespace, device: torch.device, batch: int, c: Dict[str, Dict]) -> List[Dict]:
    """Warm every contender up in order (a failure becomes an error row, and the contenders
    sharing its trainer are not run), then alternate rounds, rewriting each row's medians into
    the report after every round."""
    peaks: Dict[str, float] = {}
    live: Dict[str, Callable[[], float]] = {}
    failed: Dict[str, str] = {}
    for k, x in c.items():
        row = args.report.row(x["row"])
        if x["group"] in failed:
            row["error"] = f"not run: {failed[x['group']]}"
            continue
        try:
            reset_peak(device)
            row["warm-up s"] = seconds(partial(x["run"], args.warmup), device)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end the others
            row["error"] = failed[x["group"]] = _error(e)
            args.report.flush()
            continue
        args.report.flush()
        peaks[k] = peak_mib(device)

        def timed(fn=x["run"], k=k) -> float:
            reset_peak(device)
            s = fn(args.steps)
            peaks[k] = max(peaks[k], peak_mib(device))
            return s
        live[k] = timed

    def update(res):
        for k, v in res.items():
            s = median(v)
            c[k]["row"].update({"img/s": batch / s, "TFLOP/s": batch / s * c[k]["flop"] / 1e12,
                                "peak MiB": peaks[k], "rounds": len(v)})
        for k in res:
            _ratios(c, k, res)
        args.report.flush()

    alternate(live, args.rounds, update)
    return [x["row"] for x in c.values()]


def _ratios(c: Dict[str, Dict], k: str, res: Dict[str, List[float]]) -> None:
    """A real-data row's img/s over synthetic data's (same trainer) and over the baseline's."""
    row = c[k]["row"]
    if not row["loop"].endswith(" loader"):
        return
    syn = f"cspx synthetic b{row['batch']} {row['compile']}"
    base = f"baseline b{row['batch']}"
    if syn in res:
        row["vs synthetic"] = median(res[syn]) / median(res[k])
    if base in res and row["compile"] == EAGER:
        row["vs baseline"] = median(res[base]) / median(res[k])


def model(args: Namespace) -> Tuple[List[Dict], Dict]:
    """forward + backward + SGD step on device-resident tensors over a grid of settings, one
    variant after another (each alone in memory)."""
    device = device_of(args)
    rows: List[Dict] = []
    flops: Dict = {}                 # _flops_per_image's cache
    work: Dict[str, int] = {}        # the model's work per image, whatever the variant
    grid = itertools.product(args.batch_sizes, args.precisions, args.channels_last_grid,
                             args.compile_modes)
    for batch, prec, cl, mode in grid:
        if prec == "fp16" and device.type == "cpu":
            continue
        a = Namespace(**{**vars(args), "batch": batch, "precision": prec, "channels_last": cl})
        row = args.report.row({"batch": batch, "precision": prec, "channels_last": cl,
                               "compile": mode})
        rows.append(row)
        fresh_start(device)
        with tempfile.TemporaryDirectory() as tmp:
            t: Optional[Trainer] = None
            try:
                cfg = bench_config(a, SYNTHETIC_ONLY, *compile_keys(mode))
                t = make_trainer(cfg, device, synthetic(cfg, device), tmp, args.compile_backend)
                per_img = _flops_per_image(t.model, args.img_size, flops)
                work.setdefault("forward_flops_per_image", round(per_img / 3))
                work.setdefault("conv_output_values_per_image",
                                conv_outputs(t.model, args.img_size))
                run = trainer_runner(t, device)
                warm = seconds(partial(run, args.warmup), device)
                s = median([run(args.steps) for _ in range(args.rounds)])
                row.update({"ms/step": 1000 * s, "img/s": batch / s,
                            "TFLOP/s": batch / s * per_img / 1e12, "peak MiB": peak_mib(device),
                            "warm-up s": warm})
            except Exception as e:  # noqa: BLE001 - one failing variant must not end the others
                row["error"] = _error(e)
            finally:
                t = None
        args.report.flush()
    return rows, {"peak_memory": peak_kind(device), **work}
