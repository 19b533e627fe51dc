"""From the recipe's `data`, `aug` and `eval` sections to the two loaders the trainer iterates.

Both loader kinds share one interface (see torch_loader.TorchTrainLoader / TorchEvalLoader), so
the training loop never asks which one it has.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Tuple

import torch

from cspx.config import Config
from cspx.data import synthetic
from cspx.data.index import DatasetIndex, build_index, read_classes_file, resolve_split_dir
from cspx.data.scan import read_exclude_file
from cspx.data.torch_loader import TorchEvalLoader, TorchTrainLoader
from cspx.distributed import DistEnv, barrier
from cspx.errors import CspxError

log = logging.getLogger("cspx")


def resolve_loader(pref: str, device: torch.device) -> str:
    """'auto' -> 'dali' when DALI imports (and can use the device), else 'torch' with a notice."""
    if pref == "torch":
        return "torch"
    from cspx.data.dali_loader import dali_available
    ok, reason = dali_available(device)
    if ok:
        return "dali"
    if pref == "dali":
        raise CspxError(f"data.loader: dali is not available ({reason})")
    log.info(f"data loader: torch (DALI not available: {reason})")
    return "torch"


def fingerprint(index: DatasetIndex) -> str:
    """Identity of a dataset's contents as training sees them: files, labels and class list."""
    h = hashlib.sha256()
    h.update("\n".join(index.classes).encode())
    for rel, lab in zip(index.files, index.labels.tolist()):
        h.update(f"{rel}\t{lab}\n".encode())
    return h.hexdigest()[:16]


def build_indices(cfg: Config, env: DistEnv) -> Tuple[DatasetIndex, DatasetIndex]:
    """Index train/ and val/ under data.root (rank 0 first, so it alone scans and fills the cache)."""
    d = cfg.data
    root = os.path.expanduser(d.root)
    classes_file = d.classes
    if d.synthetic:
        if env.is_main:
            synthetic.generate(root)
        barrier(env)
        classes_file = classes_file or os.path.join(root, "synsets.txt")
    classes = read_classes_file(os.path.expanduser(classes_file)) if classes_file else None
    exclude = read_exclude_file(os.path.expanduser(d.exclude)) if d.exclude else None
    out = []
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise CspxError(f"data.root: {root!r} has no {split}/ folder (expected {split}/<wnid>/)")
        for turn in (0, 1):  # rank 0 builds (and caches) first, the others then read the cache
            if (turn == 0) == env.is_main:
                out.append(build_index(split_dir, classes, exclude, workers=max(4, d.workers),
                                       warn=env.is_main))
            barrier(env)
    train, val = out
    if train.classes != val.classes:
        raise CspxError(f"data.root: train/ and val/ hold different class folders; "
                        f"set data.classes to a synset list to fix label indices")
    return train, val


def train_dtype(precision: str) -> torch.dtype:
    """Input dtype the loader produces: fp16 for fp16 training, else float32 (bf16 autocast casts
    at the first convolution)."""
    return torch.float16 if precision == "fp16" else torch.float32


def build_train_loader(kind: str, cfg: Config, index: DatasetIndex, env: DistEnv, micro_batch: int,
                       precision: str, work_dir: str):
    common = dict(index=index, aug=cfg.aug, seed=cfg.seed, micro_batch=micro_batch, rank=env.rank,
                  world=env.world, workers=cfg.data.workers, device=env.device,
                  channels_last=cfg.model.channels_last)
    if kind == "dali":
        from cspx.data.dali_loader import DaliTrainLoader
        return DaliTrainLoader(**common, dtype=train_dtype(precision),
                               hw_decoder_load=cfg.data.dali_hw_decoder_load, file_list_dir=work_dir)
    return TorchTrainLoader(**common)


def build_eval_loader(kind: str, index: DatasetIndex, img_size: int, crop_pct: float,
                      interpolation: str, batch_size: int, env: DistEnv, workers: int,
                      channels_last: bool):
    common = dict(index=index, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation,
                  batch_size=batch_size, rank=env.rank, world=env.world, workers=workers,
                  device=env.device, channels_last=channels_last)
    if kind == "dali":
        from cspx.data.dali_loader import DaliEvalLoader
        return DaliEvalLoader(**common)
    return TorchEvalLoader(**common)
