"""What validate.py runs: a checkpoint (cspx's or timm's) evaluated on a dataset folder or a
sharded dataset's val split, with the metrics printed and optionally written as JSON and
per-image predictions (named by their original relative paths) as CSV."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

from tqdm import tqdm

from cspx import distributed, precision
from cspx.data.build import (
    build_eval_loader,
    data_format,
    held_out_shards,
    holdout_source,
    open_shards_on_every_rank,
)
from cspx.data.holdout import holdout
from cspx.data.index import FolderSplit, build_index, read_classes_file, resolve_split_dir
from cspx.data.loader import DataSplit, check_fits
from cspx.data.scan import read_exclude_file
from cspx.data.shard_format import read_manifest
from cspx.errors import CspxError
from cspx.eval_metrics import evaluate
from cspx.files import atomic_write
from cspx.models import eval_protocol
from cspx.placement import place_model
from cspx.resolve import resolve_loader
from cspx.runlog import setup_console
from cspx.weights import build_model_from_checkpoint

log = logging.getLogger("cspx")


def run(args: Namespace) -> Dict[str, Any]:
    env = distributed.init(args.device)
    try:
        return _run(args, env)
    finally:
        distributed.destroy()


def _run(args: Namespace, env: distributed.DistEnv) -> Dict[str, Any]:
    setup_console(env.is_main, args.verbose)
    precision.configure_backends(env.device, tf32=False)
    model, info = build_model_from_checkpoint(args.checkpoint, args.model, args.ema)
    split_dir, split, held = _open_val(args, env, info)
    if args.limit:
        split = split.subset(args.limit)
    check_fits("validation", len(split), args.batch_size, env.world, partial=True)
    kind = resolve_loader(args.loader, env.device)
    if (info["num_classes"] or 1000) < split.num_classes:
        raise CspxError(f"{args.checkpoint}: has {info['num_classes']} classes but the data has "
                        f"{split.num_classes}; pass --classes to map folders to its label indices")
    protocol = eval_protocol(info["model_name"], img_size=args.img_size, crop_pct=args.crop_pct,
                             interpolation=args.interpolation)
    place_model(model, device=env.device, channels_last=args.channels_last)
    loader = build_eval_loader(kind=kind, split=split, img_size=protocol.img_size,
                               crop_pct=protocol.crop_pct, interpolation=protocol.interpolation,
                               batch_size=args.batch_size, env=env, workers=args.workers,
                               channels_last=args.channels_last)
    rows: List[tuple] = []

    def keep(indices, labels, top_idx, top_prob):
        rows.extend(zip(indices.tolist(), labels.tolist(), top_idx.tolist(), top_prob.tolist()))

    bar = tqdm(total=loader.num_samples, unit="img", disable=not env.is_main, dynamic_ncols=True)
    r = evaluate(model, loader, env, args.precision, on_batch=keep if args.predictions else None,
                 progress=bar)
    bar.close()
    loader.close()
    result = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "count": r["count"],
              "images_per_sec": r["count"] / max(r["seconds"], 1e-9), "failed": r["failed"],
              "excluded": len(split.excluded),
              "settings": {"checkpoint": os.path.abspath(args.checkpoint),
                           "model": info["model_name"], "data_dir": os.path.abspath(split_dir),
                           "img_size": protocol.img_size, "crop_pct": protocol.crop_pct,
                           "interpolation": protocol.interpolation,
                           "batch_size": args.batch_size, "workers": args.workers,
                           "device": str(env.device), "world_size": env.world,
                           "precision": args.precision, "channels_last": args.channels_last,
                           "loader": kind, "classes": args.classes, "limit": args.limit,
                           "ema": args.ema, "format": split.format,
                           "val_split": held[0] if held else None,
                           "seed": held[1] if held else None}}
    if args.predictions:
        all_rows = distributed.all_gather_objects(rows, env)
        if env.is_main:
            _write_predictions(args.predictions, split,
                               sorted(x for part in all_rows for x in part))
    if env.is_main:
        print(f"top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  "
              f"loss {result['loss']:.4f}  images {result['count']}  "
              f"{result['images_per_sec']:.1f} img/s"
              + (f"  ({r['failed']} failed to decode)" if r["failed"] else ""), flush=True)
        if args.json:
            atomic_write(args.json, json.dumps(result, indent=2))
    return result


def _open_val(args: Namespace, env: distributed.DistEnv, info: Dict[str, Any]):
    """(the folder evaluated, its split, (fraction, seed) of a held-out split or None):
    --data-dir's val split, in whichever format it is; or the split held out of its training
    images, with --val-split, or by default where the checkpoint's run held one out of this
    data (data.val_split) and the data has no val split of its own."""
    asked = args.val_split is not None
    recorded = info.get("val_split")
    if asked:
        seed = args.seed if args.seed is not None else (
            recorded["seed"] if recorded else info.get("seed") or 0)
        held: Optional[Tuple[float, int]] = (args.val_split, seed)
    else:
        held = (recorded["fraction"], recorded["seed"]) if recorded else None
    if data_format(args.data_dir, "auto") == "shards":
        return _open_shards(args, env, held, asked, recorded)
    classes = read_classes_file(args.classes) if args.classes else None
    exclude = read_exclude_file(args.exclude) if args.exclude else None

    def index(folder: str) -> FolderSplit:
        return build_index(folder, classes, exclude, workers=max(4, args.workers),
                           warn=env.is_main)

    root = args.data_dir
    has_val = os.path.isdir(os.path.join(root, "val"))
    if held is None or (has_val and not asked):
        split_dir = resolve_split_dir(root, "val")
        return split_dir, index(split_dir), None
    source = holdout_source(root, "--val-split")
    whole = index(source)
    if not asked and not os.path.isdir(os.path.join(root, "train")):
        # class folders at the top: the held-out split only if it is the run's (its data)
        assert recorded is not None  # not asked: `held` is the one the checkpoint recorded
        try:
            val = holdout(whole, *held, key="--val-split")[1]
        except CspxError:
            val = None
        if val is None or val.fingerprint() != recorded["fingerprint"]:
            return source, whole, None
    return source, _held_out(whole, held, asked, recorded, env), held


def _open_shards(args: Namespace, env: distributed.DistEnv, held: Optional[Tuple[float, int]],
                 asked: bool, recorded: Optional[Dict[str, Any]]
                 ) -> Tuple[str, DataSplit, Optional[Tuple[float, int]]]:
    """_open_val of a sharded dataset: its val split, or one held out of its train split."""
    root = args.data_dir
    if held is not None and not asked and "val" in read_manifest(root).splits:
        held = None
    split = open_shards_on_every_rank(root, ["train" if held else "val"], args.classes or "",
                                      args.exclude or "", args.bad_shards, env)[0]
    if held is None:
        return os.path.join(split.root, "val"), split, None
    if "val" in split.manifest.splits:
        held_out_shards(split, *held, key="--val-split")  # refuses, naming the val split
    return os.path.join(split.root, "train"), _held_out(split, held, asked, recorded, env), held


def _held_out(whole: DataSplit, held: Tuple[float, int], asked: bool, recorded,
              env: distributed.DistEnv) -> DataSplit:
    """The split `held` (fraction, seed) holds out of `whole`, checked against the one the
    checkpoint's run recorded (same fraction and seed: the same images, unless the data
    changed)."""
    val = holdout(whole, *held, key="--val-split")[1]
    fraction, seed = held
    if not env.is_main:
        return val
    if not asked:
        log.info(f"evaluating the {fraction:g} of {whole.root} held out for validation by the "
                 f"checkpoint's run (data.val_split {fraction:g}, seed {seed}); --val-split "
                 f"sets another")
    same = recorded and (recorded["fraction"], recorded["seed"]) == (fraction, seed)
    if same and val.fingerprint() != recorded["fingerprint"]:
        log.warning(f"--val-split: the {len(val)} images held out of {whole.root} are not the "
                    f"{recorded['images']} the checkpoint's run held out (the data changed "
                    f"since, or --classes / --exclude differ)")
    return val


def _write_predictions(path: str, split: DataSplit, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "top5", "top5_prob"])
    for i, _, top, prob in rows:
        w.writerow([split.name(i), int(split.labels[i]), " ".join(map(str, top)),
                    " ".join(f"{p:.6f}" for p in prob)])
    atomic_write(path, buf.getvalue())
