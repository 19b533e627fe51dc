"""Benchmarks (scripts/benchmark.py) of data and disk: `loader`, `validate`, `checkpoint`."""
from __future__ import annotations

import os
import tempfile
import time
from argparse import Namespace
from typing import Dict, List, Tuple

import torch

from cspx import precision
from cspx.bench.common import alternate, median, seconds, sync
from cspx.bench.fixed import FixedBatchLoader
from cspx.bench.steps import bench_config, device_of, make_trainer
from cspx.data.build import build_eval_loader, build_train_loader
from cspx.data.index import build_index
from cspx.distributed import DistEnv
from cspx.eval_metrics import evaluate
from cspx.models import create_model
from cspx.resolve import resolve_loader


def _fresh_loader_runner(make, warmup: int, batches: int, batch: int, device: torch.device):
    """img/s of a loader built for this round alone: `warmup` batches fill its prefetch queues,
    then `batches` are timed, then it is closed. A loader kept alive between rounds would keep
    decoding in the background, competing with the other loader and banking batches for its
    next round."""
    def run() -> float:
        loader = make()
        try:
            for _ in range(warmup):
                next(loader)
            sync(device)
            t = time.perf_counter()
            for _ in range(batches):
                next(loader)
            sync(device)
            return batches * batch / (time.perf_counter() - t)
        finally:
            loader.close()
    return run


def loader(args: Namespace) -> Tuple[List[Dict], Dict]:
    """The DALI and torch training loaders alone on the same JPEGs, augmentations, batch and
    core count (DataLoader workers = DALI CPU threads = --workers)."""
    device = device_of(args)
    index = build_index(args.data, warn=False)
    env = DistEnv(device=device)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.loaders:
            cfg = bench_config(args, f"data.loader={kind}")
            make = (lambda cfg=cfg: build_train_loader(cfg, index, env, tmp))
            # warm-up covers the deepest prefetch queue: 4 batches per DataLoader worker
            runs[f"{kind} loader"] = _fresh_loader_runner(make, 4 * max(1, args.workers) + 2,
                                                          args.steps, args.batch, device)
        res = alternate(runs, args.rounds)
    rows = [{"loader": k, "img/s (median)": median(v), "rounds": len(v)} for k, v in res.items()]
    extra = {"images": len(index), "raw": res}
    if "dali loader" in res and "torch loader" in res:
        extra["dali_over_torch"] = median(res["dali loader"]) / median(res["torch loader"])
    return rows, extra


def validate(args: Namespace) -> Tuple[List[Dict], Dict]:
    """Evaluation throughput (decode + resize + crop + forward) per loader, set up as validate.py
    runs it: its kernel settings (cuDNN autotuning on a GPU) and precision (fp32 unless
    --precision names another)."""
    device = device_of(args)
    index = build_index(args.data, warn=False)
    env = DistEnv(device=device)
    precision.configure_backends(device, tf32=False)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = create_model(args.model, num_classes=1000).to(device, memory_format=fmt).eval()
    amp = "fp32" if args.precision == "auto" else args.precision
    rows = []
    for kind in args.loaders:
        kind = resolve_loader(kind, device)
        ld = build_eval_loader(kind, index, args.img_size, 0.875, "bilinear", args.batch, env,
                               args.workers, args.channels_last)
        evaluate(model, ld, env, amp)  # warm-up pass
        r = [evaluate(model, ld, env, amp) for _ in range(args.rounds)]
        rows.append({"loader": kind, "images": r[0]["count"],
                     "img/s (median)": median([x["count"] / x["seconds"] for x in r])})
    return rows, {}


def checkpoint(args: Namespace) -> Tuple[List[Dict], Dict]:
    """Saving a full training state (model, SGD momentum, EMA) with cspx's atomic writer vs a
    bare torch.save of the same state to the same folder."""
    device = device_of(args)
    cfg = bench_config(args, "ema.enabled=true")
    folder = args.out_dir or tempfile.mkdtemp(prefix="cspx-bench-ckpt-")
    fixed = FixedBatchLoader.random(2, 64, 1000, device, args.channels_last)
    trainer = make_trainer(cfg, device, fixed, folder)
    trainer.fit(until=1)  # one step, so the optimizer holds its momentum buffers
    state = trainer.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    bare_path = os.path.join(folder, "bare.pt")

    def bare() -> float:
        return seconds(lambda: torch.save(state, bare_path), device)

    def cspx_sync() -> float:
        trainer.ckpt.async_save = False
        return seconds(lambda: trainer.save(blocking=True), device)

    def cspx_async_blocking() -> float:
        """Time the training loop is held: the host snapshot; the write overlaps training."""
        trainer.ckpt.async_save = True
        t = seconds(lambda: trainer.save(), device)
        trainer.ckpt.wait()
        return t

    runs = {"torch.save (bare)": bare, "cspx save (atomic, fsync)": cspx_sync,
            "cspx async: time training is held": cspx_async_blocking}
    res = alternate(runs, args.rounds)
    rows = [{"writer": k, "seconds (median)": median(v), "MB/s": nbytes / 1e6 / median(v)}
            for k, v in res.items()]
    ratio = median(res["cspx save (atomic, fsync)"]) / median(res["torch.save (bare)"])
    if not args.out_dir:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return rows, {"state_mb": nbytes / 1e6, "sync_over_bare": ratio, "folder": folder, "raw": res}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
