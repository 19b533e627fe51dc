"""Evaluate a checkpoint (cspx's or timm's) on an ImageNet-layout folder: validate.py's work."""
from __future__ import annotations

import csv
import json
import logging
import os
from argparse import Namespace
from typing import Any, Dict, List, Tuple

import torch
from tqdm import tqdm

from cspx import distributed
from cspx.data.build import build_eval_loader, resolve_loader
from cspx.data.index import build_index, read_classes_file, resolve_split_dir
from cspx.data.scan import read_exclude_file
from cspx.errors import CspxError
from cspx.evaluate import evaluate
from cspx.models import create_model
from cspx.runlog import setup_console
from cspx.weights import load_into, load_weights

log = logging.getLogger("cspx")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_for(args: Namespace, num_data_classes: int) -> Tuple[torch.nn.Module, str]:
    """The architecture named by --model, else by a cspx checkpoint, else cspresnext50; the class
    count from the checkpoint's classifier."""
    loaded = load_weights(args.checkpoint, prefer_ema=args.ema)
    state, info = loaded
    if args.ema and not info["ema"]:
        raise CspxError(f"{args.checkpoint}: --ema given but the checkpoint holds no EMA weights")
    name = args.model or info.get("model_name") or "cspresnext50"
    num_classes = info.get("num_classes") or 1000
    if num_classes < num_data_classes:
        raise CspxError(f"{args.checkpoint}: has {num_classes} classes but the data has "
                        f"{num_data_classes}; pass --classes to map folders to its label indices")
    model = create_model(name, num_classes=num_classes)
    load_into(model, args.checkpoint, prefer_ema=args.ema, loaded=loaded)
    return model, name


def run(args: Namespace) -> Dict[str, Any]:
    env = distributed.init(args.device)
    try:
        return _run(args, env)
    finally:
        distributed.destroy()


def _run(args: Namespace, env: distributed.DistEnv) -> Dict[str, Any]:
    setup_console(None, env.is_main, args.verbose)
    split_dir = resolve_split_dir(args.data_dir, "val")
    classes = read_classes_file(args.classes) if args.classes else None
    exclude = read_exclude_file(args.exclude) if args.exclude else None
    index = build_index(split_dir, classes, exclude, workers=max(4, args.workers), warn=env.is_main)
    if args.limit:
        index = index.subset(args.limit)
    kind = resolve_loader(args.loader, env.device)
    model, model_name = _model_for(args, index.num_classes)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(env.device, memory_format=fmt).eval()
    loader = build_eval_loader(kind, index, args.img_size, args.crop_pct, args.interpolation,
                               args.batch_size, env, args.workers, args.channels_last)
    rows: List[tuple] = []

    def keep(indices, labels, top_idx, top_prob):
        for i, y, ti, tp in zip(indices.tolist(), labels.tolist(), top_idx.tolist(), top_prob.tolist()):
            rows.append((i, y, ti, tp))

    bar = tqdm(total=loader.num_samples, unit="img", disable=not env.is_main, dynamic_ncols=True)
    r = evaluate(model, loader, env, AMP[args.amp], on_batch=keep if args.predictions else None,
                 progress=bar)
    bar.close()
    result = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "count": r["count"],
              "images_per_sec": r["count"] / max(r["seconds"], 1e-9), "failed": r["failed"],
              "excluded": len(index.excluded),
              "settings": {"checkpoint": os.path.abspath(args.checkpoint), "model": model_name,
                           "data_dir": os.path.abspath(split_dir), "img_size": args.img_size,
                           "crop_pct": args.crop_pct, "interpolation": args.interpolation,
                           "batch_size": args.batch_size, "workers": args.workers,
                           "device": str(env.device), "world_size": env.world, "amp": args.amp,
                           "channels_last": args.channels_last, "loader": kind,
                           "classes": args.classes, "limit": args.limit, "ema": args.ema}}
    if args.predictions:
        all_rows = distributed.all_gather_objects(rows, env)
        if env.is_main:
            _write_predictions(args.predictions, index, sorted(x for part in all_rows for x in part))
    if env.is_main:
        print(f"top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  loss {result['loss']:.4f}  "
              f"images {result['count']}  {result['images_per_sec']:.1f} img/s"
              + (f"  ({r['failed']} failed to decode)" if r["failed"] else ""), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


def _write_predictions(path: str, index, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "top5", "top5_prob"])
        for i, _, top, prob in rows:
            w.writerow([index.files[i], int(index.labels[i]), " ".join(map(str, top)),
                        " ".join(f"{p:.6f}" for p in prob)])
