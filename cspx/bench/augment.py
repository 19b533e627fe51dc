"""The `augment` benchmark: each augmentation's cost per image on both loaders.

- Per-image policies on the CPU: each RandAugment op, RandAugment with 2 ops, TrivialAugment Wide
  and AutoAugment's ImageNet policy, in DALI (the ops cspx's DALI pipeline runs) and in
  torchvision on PIL (what the torch path runs), on the same images, one thread each. It explains
  the CPU loader ratio: a RandAugment op's cost enters a loader's per-image cost with weight
  n / 14 (n ops drawn from 14 per image).
- Batch augmentations on the run's device (--device): mixup, CutMix and random erasing, which run
  after either loader on the batch it hands out (the same code on the same tensor), so one
  measurement is the cost on both; the table shows it in both columns.
"""
from __future__ import annotations

import os
import random
import time
from argparse import Namespace
from typing import Callable, Dict, List, Tuple

import numpy as np

from cspx.bench.common import alternate, median
from cspx.bench.steps import bench_config, device_of
from cspx.data.index import build_index
from cspx.data.transforms import INTERP, RA_BINS, ra_magnitude_bin

# DALI suite name -> torchvision op name (torchvision.transforms.RandAugment's op list)
TV_NAMES = {"translate_x": "TranslateX", "translate_y": "TranslateY", "shear_x": "ShearX",
            "shear_y": "ShearY", "rotate": "Rotate", "brightness": "Brightness",
            "contrast": "Contrast", "color": "Color", "sharpness": "Sharpness",
            "posterize": "Posterize", "solarize": "Solarize", "equalize": "Equalize",
            "auto_contrast": "AutoContrast", "identity": "Identity"}


def _images(args: Namespace, count: int) -> List[np.ndarray]:
    """`count` of the benchmark's JPEGs, decoded by PIL and resized to img_size square (uint8 HWC):
    the size RandAugment works at in both loaders."""
    from PIL import Image
    index = build_index(args.data, warn=False)
    out = []
    for rel in index.files[:count]:
        with Image.open(os.path.join(index.root, rel)) as im:
            small = im.convert("RGB").resize((args.img_size, args.img_size),
                                             Image.Resampling.BILINEAR)
            out.append(np.asarray(small).copy())
    if len(out) < count:
        out = (out * (count // len(out) + 1))[:count]
    return out


def _dali_runner(images, op, m: int, interp, size: int, base=None):
    """Seconds per image of `op` on one DALI CPU thread, minus the same pipeline without it.
    `op` is an auto_aug augmentation, a list of them (RandAugment with n=2 over that suite), or
    a plain function of a DALI node; `base(node)`, when given, runs in both pipelines first."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.auto_aug.core import _Augmentation, signed_bin
    from nvidia.dali.types import DALIDataType

    @pipeline_def(enable_conditionals=True)
    def pipe(apply):
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        if base is not None:
            x = base(x)
        if not apply:
            return x
        kw = dict(num_magnitude_bins=RA_BINS, shape=[size, size], fill_value=0, interp_type=interp)
        if isinstance(op, list):
            return rand_augment.apply_rand_augment(op, x, n=2, m=m, **kw)
        if not isinstance(op, _Augmentation):
            return op(x)
        # a random sign per image, as RandAugment draws it; each op takes the kwargs it names
        return op(x, magnitude_bin=signed_bin(m, random_sign=fn.random.coin_flip(
            dtype=DALIDataType.INT32)), **kw)

    pipes = []
    for apply in (False, True):
        p = pipe(apply, batch_size=len(images), num_threads=1, device_id=None, seed=1,
                 prefetch_queue_depth=1)
        p.build()
        p.run()
        pipes.append(p)

    def run() -> float:
        ts = []
        for p in pipes:
            t = time.perf_counter()
            for _ in range(3):
                p.run()
            ts.append((time.perf_counter() - t) / 3)
        return (ts[1] - ts[0]) / len(images)
    return run


def _dali_extras():
    """Rows behind figures the docs quote: DALI's own contrast and solarize (which cspx's suite
    rebuilds) and the float -> uint8 cast alone. (row name, DALI op, base, torchvision op)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as aa
    from nvidia.dali.types import DALIDataType
    return [("contrast (DALI's own op)", aa.contrast, None, "Contrast"),
            ("solarize (DALI's own op)", aa.solarize, None, "Solarize"),
            ("float -> uint8 cast", lambda x: fn.cast(x, dtype=DALIDataType.UINT8),
             lambda x: fn.cast(x, dtype=DALIDataType.FLOAT), None)]


def _torch_runner(pil_images, name: str, m: int, interp, size: int):
    """Seconds per image of torchvision's op at bin m (random sign for signed ops), as
    T.RandAugment applies it ('randaugment': T.RandAugment itself, 2 ops; 'trivialaugment',
    'autoaugment': T.TrivialAugmentWide and T.AutoAugment's ImageNet policy)."""
    from torchvision import transforms as T
    from torchvision.transforms import autoaugment as A
    if name == "randaugment":
        apply = T.RandAugment(num_ops=2, magnitude=m, num_magnitude_bins=RA_BINS,
                              interpolation=interp, fill=[0, 0, 0])
    elif name == "trivialaugment":
        apply = T.TrivialAugmentWide(num_magnitude_bins=31, interpolation=interp)
    elif name == "autoaugment":
        apply = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=interp)
    else:
        mags, signed = T.RandAugment()._augmentation_space(RA_BINS, (size, size))[name]
        mag = float(mags[m]) if mags.ndim > 0 else 0.0

        def apply(img):
            sign = -1.0 if signed and random.random() < 0.5 else 1.0
            return A._apply_op(img, name, sign * mag, interpolation=interp, fill=[0, 0, 0])

    def run() -> float:
        t = time.perf_counter()
        for img in pil_images:
            apply(img)
        return (time.perf_counter() - t) / len(pil_images)
    return run


def augment(args: Namespace) -> Tuple[List[Dict], Dict]:
    from PIL import Image

    from cspx.data.dali_pipelines import INTERP as DALI_INTERP
    from cspx.data.dali_policies import rand_augment_suite
    cfg = bench_config(args)
    m = ra_magnitude_bin(cfg.aug.randaugment_magnitude)
    mode = cfg.aug.randaugment_interpolation
    images = _images(args, args.batch)
    pil = [Image.fromarray(a) for a in images]
    suite = rand_augment_suite(m, on_gpu=False)
    # (row name, DALI op or the whole suite, base, torchvision op name or None)
    contenders = [(op.name, op, None, TV_NAMES[op.name]) for op in suite]
    contenders.append(("RandAugment, 2 ops", suite, None, "randaugment"))
    for row, policy in (("TrivialAugment Wide", "trivialaugment"),
                        ("AutoAugment, ImageNet policy", "autoaugment")):
        contenders.append((row, _policy_op(policy, args.img_size, DALI_INTERP[mode]), None,
                           policy))
    contenders += _dali_extras()
    runs = {}
    for row, dali_op, base, tv in contenders:
        runs[(row, "dali")] = _dali_runner(images, dali_op, m, DALI_INTERP[mode], args.img_size,
                                           base)
        if tv is not None:
            runs[(row, "tv")] = _torch_runner(pil, tv, m, INTERP[mode], args.img_size)
    res = alternate(runs, args.rounds)
    rows = []
    for row, _, _, tv in contenders:
        d = median(res[(row, "dali")]) * 1e3
        t = median(res[(row, "tv")]) * 1e3 if tv is not None else None
        # identity costs nothing in either: its difference is timing noise, and so is its ratio
        rows.append({"op": row, "DALI ms/img": d, "torchvision ms/img": "-" if t is None else t,
                     "DALI / torchvision": d / t if t is not None and min(d, t) > 0.01 else "-"})
    device = device_of(args)
    batch_res = alternate(_batch_runners(cfg, args, device), args.rounds)
    for row, ts in batch_res.items():
        t = median(ts) * 1e3
        rows.append({"op": row, "DALI ms/img": t, "torchvision ms/img": t,
                     "DALI / torchvision": "-"})
    raw = {f"{row} | {lib}": v for (row, lib), v in res.items()}  # JSON keys are strings
    raw.update({f"{row} | {device.type}": v for row, v in batch_res.items()})
    return rows, {"magnitude_bin": m, "interpolation": mode, "images": len(images),
                  "batch_device": str(device), "raw": raw}


def _policy_op(policy: str, size: int, interp):
    """A whole aug.policy as the DALI pipeline applies it, as a function of a DALI node."""
    from cspx.data.dali_policies import apply_policy
    return lambda x: apply_policy(x, policy, 0, 0, size, interp, on_gpu=False)


# the batch augmentations measured, as recipe overrides (probability 1: the cost of one mixed or
# erased image; with a probability p a batch costs p times that on average)
BATCH_ROWS = (
    ("mixup, alpha 0.2 (batch)", ["aug.mixup_alpha=0.2"]),
    ("CutMix, alpha 1 (batch)", ["aug.cutmix_alpha=1.0"]),
    ("mixup + CutMix per image (elem)", ["aug.mixup_alpha=0.8", "aug.cutmix_alpha=1.0",
                                         "aug.mix_mode=elem"]),
    ("random erasing, pixel", ["aug.erase_prob=1.0", "aug.erase_mode=pixel"]),
    ("random erasing, rand", ["aug.erase_prob=1.0", "aug.erase_mode=rand"]),
    ("random erasing, const", ["aug.erase_prob=1.0", "aug.erase_mode=const"]),
)


def _batch_runners(cfg, args: Namespace, device) -> Dict[str, Callable[[], float]]:
    """Seconds per image of each batch augmentation on `device`, on a batch as the loaders hand
    it out (the run's dtype and memory format), device work included."""
    import torch

    from cspx import precision
    from cspx.bench.common import seconds
    from cspx.data.batch_aug import BatchAugment
    dtype = precision.loader_dtype(precision.of(cfg), device)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).to(
        dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    off = ["aug.mixup_alpha=0", "aug.cutmix_alpha=0", "aug.cutmix_minmax=null",
           "aug.erase_prob=0"]
    runs: Dict[str, Callable[[], float]] = {}
    for row, keys in BATCH_ROWS:
        stage = BatchAugment(aug=bench_config(args, *off, *keys).aug, num_classes=1000,
                             label_smoothing=0.1, device=device, seed=0, rank=0)
        stage(x, y)  # warm-up (allocations, first kernels)

        def run(stage=stage) -> float:
            return seconds(lambda: [stage(x, y) for _ in range(args.steps)],
                           device) / (args.steps * args.batch)
        runs[row] = run
    return runs
