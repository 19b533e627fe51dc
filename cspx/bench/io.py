"""Benchmarks (scripts/benchmark.py) of data and disk: `loader`, `validate`, `checkpoint`."""
from __future__ import annotations

import os
import tempfile
import time
from argparse import Namespace
from typing import Callable, Dict, List, Tuple

import torch

from cspx import precision
from cspx.bench.common import alternate, median, seconds, sync
from cspx.bench.fixed import FixedBatchLoader
from cspx.bench.steps import BENCH_CLASSES, SYNTHETIC_ONLY, bench_config, device_of, make_trainer
from cspx.checkpoint import leaves, verify
from cspx.config import micro_batch, resolved
from cspx.data.build import build_eval_loader, build_train_loader
from cspx.data.index import build_index
from cspx.data.loader import check_fits
from cspx.distributed import DistEnv
from cspx.errors import CspxError
from cspx.eval_metrics import evaluate
from cspx.models import create_model, eval_protocol
from cspx.placement import place_model
from cspx.resolve import resolve_loader


def _fresh_loader_runner(make, warmup: int, batches: int, batch: int, device: torch.device):
    """img/s of a loader built for this round alone: `warmup` batches start its workers and
    pipeline, then `batches` are timed, then it is closed. A loader kept alive between rounds
    would keep decoding in the background, competing with the other loader and banking batches
    for its next round. The warm-up is a fixed number of batches, whatever the worker count:
    consuming is far faster than producing here, so queues prefetched during the warm-up are
    empty a few batches into the timed part."""
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


# --loaders names: (data.loader, DaliTrainLoader.copy_out: None = its default for the device)
LOADER_VARIANTS = {"dali": ("dali", None), "dali-copy": ("dali", True),
                   "dali-zerocopy": ("dali", False), "torch": ("torch", None)}


def _loader_name(variant: str, device: torch.device) -> str:
    kind, copy = LOADER_VARIANTS[variant]
    if kind != "dali":
        return f"{kind} loader"
    copy = device.type == "cuda" if copy is None else copy
    return f"dali loader ({'copy' if copy else 'zero-copy'})"


def loader(args: Namespace) -> Tuple[List[Dict], Dict]:
    """The DALI and torch training loaders alone on the same JPEGs, augmentations, batch and
    core count (DataLoader workers = DALI CPU threads = --workers). On a GPU the DALI loader
    copies each batch into torch-owned memory (dali_loader's docstring); `dali-copy` and
    `dali-zerocopy` measure both choices."""
    device = device_of(args)
    split = build_index(args.data, warn=False)
    env = DistEnv(device=device)
    bad = [v for v in args.loaders if v not in LOADER_VARIANTS]
    if bad:
        raise CspxError(f"--loaders: unknown {bad[0]!r}; choose from {', '.join(LOADER_VARIANTS)}")
    runs: Dict[str, Callable[[], float]] = {}
    rows: Dict[str, Dict] = {}

    def update(res):
        for k, v in res.items():
            rows[k].update({"img/s (median)": median(v), "rounds": len(v)})
        args.report.flush()

    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.loaders:
            kind, copy = LOADER_VARIANTS[variant]
            cfg = bench_config(args, f"data.loader={kind}")
            # the check a run makes in cspx.resolve: one batch fits in --data
            check_fits("training", len(split), micro_batch(cfg, 1), 1, partial=False)

            def make(cfg=cfg, copy=copy):
                ld = build_train_loader(cfg, split, env, tmp)
                if copy is not None:  # a dali variant (LOADER_VARIANTS): copy out or not
                    from cspx.data.dali_loader import DaliTrainLoader
                    assert isinstance(ld, DaliTrainLoader)
                    ld.copy_out = copy
                return ld
            name = _loader_name(variant, device)
            runs[name] = _fresh_loader_runner(make, args.warmup, args.steps, args.batch, device)
            rows[name] = args.report.row({"loader": name})
        res = alternate(runs, args.rounds, update)
    extra = {"images": len(split), "warmup_batches": args.warmup, "raw": res}
    dali = [k for k in res if k.startswith("dali")]
    if dali and "torch loader" in res:
        extra["dali_over_torch"] = median(res[dali[0]]) / median(res["torch loader"])
    return list(rows.values()), extra


def validate(args: Namespace) -> Tuple[List[Dict], Dict]:
    """Evaluation throughput (decode + resize + crop + forward) per loader, set up as validate.py
    runs it: its kernel settings (cuDNN autotuning on a GPU), the model's evaluation protocol at
    --img-size (cspx.models.eval_protocol) and precision (fp32 unless --precision names
    another)."""
    device = device_of(args)
    split = build_index(args.data, warn=False)
    env = DistEnv(device=device)
    precision.configure_backends(device, tf32=False)
    model = create_model(args.model, num_classes=BENCH_CLASSES)
    place_model(model, device=device, channels_last=args.channels_last)
    model.eval()
    protocol = eval_protocol(args.model, img_size=args.img_size)
    amp = "fp32" if args.precision == "auto" else args.precision
    rows = []
    for kind in args.loaders:
        kind = resolve_loader(kind, device)
        ld = build_eval_loader(kind=kind, split=split, img_size=protocol.img_size,
                               crop_pct=protocol.crop_pct, interpolation=protocol.interpolation,
                               batch_size=args.batch, env=env, workers=args.workers,
                               channels_last=args.channels_last)
        evaluate(model, ld, env, amp)  # warm-up pass
        r = [evaluate(model, ld, env, amp) for _ in range(args.rounds)]
        ld.close()
        rows.append(args.report.row({"loader": kind, "images": r[0]["count"],
                                     "img/s (median)": median([x["count"] / x["seconds"]
                                                               for x in r])}))
    return rows, {"precision": amp}


def checkpoint(args: Namespace) -> Tuple[List[Dict], Dict]:
    """Saving a full training state (model, SGD momentum, EMA) with cspx's atomic writer vs a
    bare torch.save of the same state to the same folder; and verifying the written file's
    checksums (cspx.checkpoint.verify: the CRC32 of every zip member, which every load of a
    checkpoint or weights file does first), against torch.load of the same file. Both read a
    file the save has just written, so from the page cache: the CPU cost, not the disk's."""
    device = device_of(args)
    cfg = bench_config(args, SYNTHETIC_ONLY, "ema.enabled=true")
    # a folder of its own, made here and removed at the end (inside --out-dir when given, so
    # nothing of the user's there is touched)
    folder = tempfile.mkdtemp(prefix="cspx-bench-ckpt-", dir=args.out_dir)
    classes = resolved(cfg.model.num_classes, "model.num_classes")
    fixed = FixedBatchLoader.random(batch=2, img_size=64, num_classes=classes, device=device,
                                    channels_last=args.channels_last)
    trainer = make_trainer(cfg, device, fixed, folder)
    trainer.fit(until=1)  # one step, so the optimizer holds its momentum buffers
    state = trainer.ckpt.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in leaves(state)
                 if isinstance(t, torch.Tensor))
    bare_path = os.path.join(folder, "bare.pt")

    def bare() -> float:
        return seconds(lambda: torch.save(state, bare_path), device)

    def cspx_sync() -> float:
        trainer.ckpt.async_save = False
        return seconds(lambda: trainer.ckpt.save(trainer.progress.step, final="a benchmark save"),
                       device)

    def cspx_async_blocking() -> float:
        """Time the training loop is held: the host snapshot; the write overlaps training."""
        trainer.ckpt.async_save = True
        t = seconds(lambda: trainer.ckpt.save(trainer.progress.step), device)
        trainer.ckpt.wait()
        return t

    saved = trainer.ckpt.path_for(trainer.progress.step)

    def verify_crc() -> float:
        return seconds(lambda: verify(saved), torch.device("cpu"))

    def torch_load() -> float:
        return seconds(lambda: torch.load(saved, map_location="cpu", weights_only=True),
                       torch.device("cpu"))

    runs = {"torch.save (bare)": bare, "cspx save (atomic, fsync)": cspx_sync,
            "cspx async: time training is held": cspx_async_blocking,
            "verify (CRC32 of every member)": verify_crc, "torch.load (weights_only)": torch_load}
    rows = {k: args.report.row({"writer": k}) for k in runs}

    def update(res):
        for k, v in res.items():
            size = file_bytes if k in ("verify (CRC32 of every member)",
                                       "torch.load (weights_only)") else nbytes
            rows[k].update({"seconds (median)": median(v), "MB/s": size / 1e6 / median(v)})
        args.report.flush()
    cspx_sync()  # the file verify and torch.load read
    file_bytes = os.path.getsize(saved)
    res = alternate(runs, args.rounds, update)
    ratio = median(res["cspx save (atomic, fsync)"]) / median(res["torch.save (bare)"])
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    verify_mb_s = file_bytes / 1e6 / median(res["verify (CRC32 of every member)"])
    return list(rows.values()), {"state_mb": nbytes / 1e6, "file_mb": file_bytes / 1e6,
                                 "sync_over_bare": ratio, "verify_mb_per_s": verify_mb_s,
                                 "folder": folder, "raw": res}
