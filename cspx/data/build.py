"""Stage 1 of a training run (setup), data: the dataset indices, then the two loaders the trainer
iterates, from the resolved config's `data`, `aug`, `eval` and `train` sections.

Both loader kinds implement cspx.data.loader's interface, so the training loop never asks which
one it has. This module is the one reader of `data.loader`.
"""
from __future__ import annotations

import logging
import os
from typing import Tuple

from cspx import precision
from cspx.config import Config, micro_batch
from cspx.data import synthetic
from cspx.data.index import DatasetIndex, build_index, read_classes_file
from cspx.data.loader import EvalLoader, TrainLoader
from cspx.data.scan import read_exclude_file
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


def build_indices(cfg: Config, env: DistEnv) -> Tuple[DatasetIndex, DatasetIndex]:
    """Index train/ and val/ under data.root. Rank 0 generates the demo set if asked and scans;
    the other ranks wait for it without a collective timeout and receive its result, so a scan
    of 1.28M files on a cold network filesystem cannot time out the job."""
    d = cfg.data
    root = os.path.abspath(os.path.expanduser(d.root))

    def scan() -> Tuple[DatasetIndex, DatasetIndex]:
        if d.synthetic:
            synthetic.generate(root)
        listed = classes_file(cfg)
        classes = read_classes_file(listed) if listed else None
        exclude = read_exclude_file(os.path.expanduser(d.exclude)) if d.exclude else None
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


def build_train_loader(cfg: Config, index: DatasetIndex, env: DistEnv, work_dir: str) -> TrainLoader:
    """The training loader data.loader names, producing precision.loader_dtype images."""
    common = dict(index=index, aug=cfg.aug, seed=cfg.seed, micro_batch=micro_batch(cfg, env.world),
                  rank=env.rank, world=env.world, workers=cfg.data.workers, device=env.device,
                  channels_last=cfg.model.channels_last,
                  dtype=precision.loader_dtype(precision.of(cfg), env.device))
    if cfg.data.loader == "dali":
        from cspx.data.dali_loader import DaliTrainLoader
        return DaliTrainLoader(**common, hw_decoder_load=cfg.data.dali_hw_decoder_load,
                               file_list_dir=work_dir)
    return TorchTrainLoader(**common)


def build_eval_loader(kind: str, index: DatasetIndex, img_size: int, crop_pct: float,
                      interpolation: str, batch_size: int, env: DistEnv, workers: int,
                      channels_last: bool, file_list_dir: str = "") -> EvalLoader:
    """An evaluation loader of `kind` ('torch' or 'dali'); float32 images (the model's autocast
    casts), every image of `index` in exactly one rank's share."""
    common = dict(index=index, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation,
                  batch_size=batch_size, rank=env.rank, world=env.world, workers=workers,
                  device=env.device, channels_last=channels_last)
    if kind == "dali":
        from cspx.data.dali_loader import DaliEvalLoader
        return DaliEvalLoader(**common, file_list_dir=file_list_dir or None)
    return TorchEvalLoader(**common)


def eval_loader_for(cfg: Config, index: DatasetIndex, env: DistEnv, work_dir: str) -> EvalLoader:
    """The evaluation loader of a training run (its eval section, its data.loader)."""
    e = cfg.eval
    return build_eval_loader(cfg.data.loader, index, e.img_size, e.crop_pct, e.interpolation,
                             e.batch_size, env, cfg.data.workers, cfg.model.channels_last,
                             work_dir)
