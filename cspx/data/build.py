"""Stage 1 of a training run (setup), data: the dataset splits, then the two loaders the trainer
iterates, from the resolved config's `data`, `aug`, `eval` and `train` sections.

Both loader kinds implement cspx.data.loader's interface, so the training loop never asks which
one it has, and both read either data format (a `loader.DataSplit`: a folder's split or a shard
split). This module is where `data.loader`, `data.format`, `data.bad_shards` and
`data.val_split` take effect: it alone decides from them which splits and loaders a run gets.
Others only report them (plan.py's --dry-run, the validate.py command a run prints at its end,
the benchmarks' row names).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Sequence, Tuple

from cspx import distributed, precision
from cspx.config import Config, micro_batch, resolved
from cspx.data import synthetic
from cspx.data.holdout import holdout
from cspx.data.index import build_index, read_classes_file, resolve_split_dir
from cspx.data.loader import DataSplit, EvalLoader, TrainLoader
from cspx.data.scan import read_exclude_file
from cspx.data.shard_format import MANIFEST, MARKER, read_manifest
from cspx.data.shard_reader import ShardSplit
from cspx.data.torch_loader import TorchEvalLoader, TorchTrainLoader
from cspx.distributed import DistEnv, main_first
from cspx.errors import CspxError

log = logging.getLogger("cspx")


def classes_file(cfg: Config) -> str:
    """The synset list fixing label indices: data.classes, or the demo set's own list."""
    if cfg.data.classes:
        return os.path.expanduser(cfg.data.classes)
    if cfg.data.synthetic:
        return os.path.join(os.path.expanduser(cfg.data.root), "synsets.txt")
    return ""


def data_format(root: str, fmt: str) -> str:
    """data.format with 'auto' decided: 'shards' when `root` holds a manifest, else 'folder'."""
    if fmt != "auto":
        return fmt
    # make_shards.py's marker without its manifest: an unfinished one, which read_manifest names
    made = any(os.path.exists(os.path.join(root, f)) for f in (MANIFEST, MARKER))
    return "shards" if made else "folder"


def open_shards(root: str, splits: Sequence[str], classes: str = "", exclude: str = "",
                bad_shards: str = "refuse", warn: bool = True) -> List[ShardSplit]:
    """The splits of the sharded dataset at `root`, each through the start-up check. Its labels
    are fixed by its manifest: a class list given beside it must agree; an exclusion list (for
    folders) does not apply, make_shards.py having left out every image that does not decode."""
    if exclude:
        raise CspxError(f"data.exclude: {root} is a sharded dataset, whose undecodable images "
                        f"scripts/make_shards.py already left out; set data.exclude to null")
    manifest = read_manifest(root)
    out = [ShardSplit(root, s, bad_shards, manifest=manifest, warn=warn) for s in splits]
    if classes and read_classes_file(classes) != out[0].classes:
        raise CspxError(f"data.classes: {classes} lists other classes, or another order, than the "
                        f"sharded dataset {root} (its synsets.txt); set data.classes to null")
    return out


def open_shards_on_every_rank(root: str, splits: Sequence[str], classes: str, exclude: str,
                              bad_shards: str, env: DistEnv) -> List[ShardSplit]:
    """open_shards on every rank: each checks the copy it reads (on a cluster often its node's
    local copy; the check reads 256 KiB a shard). Then the ranks agree or all stop: one rank's
    failure stops every rank with its message, and copies giving different samples (a shard
    excluded on one node only) are refused."""
    if not env.distributed:
        return open_shards(root, splits, classes, exclude, bad_shards)
    out, status = None, ""
    try:
        out = open_shards(root, splits, classes, exclude, bad_shards, warn=env.is_main)
    except CspxError as e:
        status = f"rank {env.rank}: {e}"
    seen = distributed.all_gather_objects(
        (status, [s.fingerprint() for s in out] if out else None), env)
    failed = [msg for msg, _ in seen if msg]
    if failed:
        raise CspxError(failed[0])
    assert out is not None  # this rank's failure is among `failed`
    if len({tuple(f) for _, f in seen}) > 1:
        raise CspxError(f"data.root: the ranks read different samples from {root} (a shard "
                        f"excluded on some nodes' copies only?); check each node's copy with "
                        f"scripts/make_shards.py --verify")
    return out


def build_splits(cfg: Config, env: DistEnv) -> Tuple[DataSplit, DataSplit]:
    """The train and val splits of data.root, in data.format: a folder indexed (train/ and val/),
    or shards opened through their start-up check on every rank; with data.val_split, the val
    split is held out of the training images (cspx.data.holdout). For a folder rank 0 generates
    the demo set if asked and scans; the other ranks wait for it without a collective timeout
    and receive its result, so a scan of 1.28M files on a cold network filesystem cannot time
    out the job."""
    d = cfg.data
    root = os.path.abspath(os.path.expanduser(d.root))
    if data_format(root, d.format) == "shards":
        if d.synthetic:
            raise CspxError("data.synthetic: true generates a folder dataset, and data.root "
                            f"{root} is a sharded one; set data.synthetic=false")
        exclude = os.path.expanduser(d.exclude) if d.exclude else ""
        splits = ("train",) if d.val_split is not None else ("train", "val")
        opened = open_shards_on_every_rank(root, splits, classes_file(cfg), exclude,
                                           d.bad_shards, env)
        if d.val_split is not None:
            return held_out_shards(opened[0], d.val_split, cfg.seed, "data.val_split")
        return opened[0], opened[1]

    def scan() -> Tuple[DataSplit, DataSplit]:
        if d.synthetic:
            synthetic.generate(root)
        listed = classes_file(cfg)
        classes = read_classes_file(listed) if listed else None
        exclude = read_exclude_file(os.path.expanduser(d.exclude)) if d.exclude else None
        if d.val_split is not None:
            whole = build_index(holdout_source(root, "data.val_split"), classes, exclude,
                                workers=max(4, d.workers))
            return holdout(whole, d.val_split, cfg.seed, "data.val_split")
        out = []
        for split in ("train", "val"):
            split_dir = os.path.join(root, split)
            if not os.path.isdir(split_dir):
                raise CspxError(f"data.root: {root!r} has no {split}/ folder "
                                f"(expected {split}/<wnid>/)")
            out.append(build_index(split_dir, classes, exclude, workers=max(4, d.workers)))
        if out[0].classes != out[1].classes:
            raise CspxError("data.root: train/ and val/ hold different class folders; set "
                            "data.classes to a synset list to fix label indices")
        return out[0], out[1]

    return main_first(scan, env, "indexing data.root")


def holdout_source(root: str, key: str) -> str:
    """The folder a validation split is held out of: root/train/, or root itself when it holds
    the class folders. A dataset with a val/ folder of its own is refused: which of the two
    to validate on would be a guess."""
    if os.path.isdir(os.path.join(root, "val")):
        raise CspxError(f"{key}: {root} has a val/ folder of its own; a held-out split is for "
                        f"data without one ({_use_val(key)}/)")
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else resolve_split_dir(root, "train")


def held_out_shards(train: ShardSplit, fraction: float, seed: int,
                    key: str) -> Tuple[DataSplit, DataSplit]:
    """`holdout` of a sharded dataset's train split; one with a val split is refused."""
    if "val" in train.manifest.splits:
        raise CspxError(f"{key}: {train.root} has a val split of its own; a held-out split is "
                        f"for data without one ({_use_val(key)})")
    return holdout(train, fraction, seed, key)


def _use_val(key: str) -> str:
    return f"drop {key} to evaluate val" if key.startswith("--") else f"set {key}=null to use val"


def build_train_loader(cfg: Config, split: DataSplit, env: DistEnv, work_dir: str) -> TrainLoader:
    """The training loader data.loader names, producing precision.loader_dtype images."""
    # the arguments both loaders take (keyword-only constructors)
    common: Dict[str, Any] = dict(
        split=split, aug=cfg.aug, seed=cfg.seed, micro_batch=micro_batch(cfg, env.world),
        rank=env.rank, world=env.world, workers=cfg.data.workers, device=env.device,
        channels_last=cfg.model.channels_last,
        dtype=precision.loader_dtype(precision.of(cfg), env.device))
    if cfg.data.loader == "dali":
        from cspx.data.dali_loader import DaliTrainLoader
        return DaliTrainLoader(**common, hw_decoder_load=cfg.data.dali_hw_decoder_load,
                               file_list_dir=work_dir)
    return TorchTrainLoader(**common)


def build_eval_loader(*, kind: str, split: DataSplit, img_size: int, crop_pct: float,
                      interpolation: str, batch_size: int, env: DistEnv, workers: int,
                      channels_last: bool, file_list_dir: str = "") -> EvalLoader:
    """An evaluation loader of `kind` ('torch' or 'dali'); float32 images (the model's autocast
    casts), every image of `split` in exactly one rank's share."""
    common: Dict[str, Any] = dict(
        split=split, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation,
        batch_size=batch_size, rank=env.rank, world=env.world, workers=workers,
        device=env.device, channels_last=channels_last)
    if kind == "dali":
        from cspx.data.dali_loader import DaliEvalLoader
        return DaliEvalLoader(**common, file_list_dir=file_list_dir or None)
    return TorchEvalLoader(**common)


def eval_loader_for(cfg: Config, split: DataSplit, env: DistEnv, work_dir: str) -> EvalLoader:
    """The evaluation loader of a training run (its eval section, its data.loader)."""
    e = cfg.eval
    return build_eval_loader(kind=cfg.data.loader, split=split,
                             img_size=resolved(e.img_size, "eval.img_size"),
                             crop_pct=resolved(e.crop_pct, "eval.crop_pct"),
                             interpolation=resolved(e.interpolation, "eval.interpolation"),
                             batch_size=e.batch_size, env=env, workers=cfg.data.workers,
                             channels_last=cfg.model.channels_last, file_list_dir=work_dir)
