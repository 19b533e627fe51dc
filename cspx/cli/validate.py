"""The command line of validate.py and `cspx-validate`: `--checkpoint PATH --data-dir DIR`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cspx.errors import CspxError, run_cli

EPILOG = """\
DIR is an ImageNet-layout folder: DIR/<wnid>/*.JPEG, or DIR/val/<wnid>/*.JPEG; or a sharded
dataset from scripts/make_shards.py (DIR/shards.json), whose val split is read (docs/data.md).
defaults follow the model's card (cspx.models.eval_preset; cspresnext50: 224 px, crop 0.875,
shorter side resized to floor(224 / 0.875) = 256, bilinear, ImageNet mean/std), fp32, and the
torch loader (PIL, bit-exact with timm's eval transform). Released timm weights:
  python validate.py --checkpoint cspresnext50_ra_224-648b4713.pth --data-dir /data/imagenet
  (expected: top-1 80.05, top-5 94.94)
no val split (data.val_split): the run's validate command passes --val-split F --seed S, and
by default a checkpoint evaluates the split its run held out of DIR's training images
multi-GPU: torchrun --nproc_per_node=8 validate.py ... (every image counted exactly once)
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="validate.py", description="Top-1/top-5 of a checkpoint.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="cspx checkpoint or a (timm) state_dict")
    p.add_argument("--data-dir", required=True, help="ImageNet-layout validation folder, or a "
                   "sharded dataset (found by its shards.json)")
    p.add_argument("--model",
                   help="architecture (default: from a cspx checkpoint, else cspresnext50)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--img-size", type=int, help="centre-crop side, px (default: the model's)")
    p.add_argument("--crop-pct", type=float, help="resize the shorter side to floor(img-size / "
                   "crop-pct) first (default: the model's)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"],
                   help="resize filter (default: the model's)")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype; fp32 (default) reproduces published numbers")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--loader", choices=["torch", "dali"], default="torch",
                   help="torch (default): PIL decoding and resizing, bit-exact with timm's eval "
                        "transform, the protocol behind published numbers. dali: DALI decoding "
                        "and resizing, faster on a GPU; it differs from PIL by about 0.003 mean "
                        "absolute difference per pixel (normalized units, on CPU), which flips a "
                        "few near-tie predictions (docs/dali.md)")
    p.add_argument("--classes", help="synset list fixing label indices (first token per line)")
    p.add_argument("--exclude", help="exclusion list from scripts/check_dataset.py (folders)")
    p.add_argument("--bad-shards", choices=["refuse", "exclude"], default="refuse",
                   help="a shard failing the start-up check: refuse (default: stop, naming it) "
                        "or exclude (evaluate without its images, with a warning)")
    p.add_argument("--json", help="write metrics and settings to this JSON file (an existing file "
                                  "is overwritten)")
    p.add_argument("--predictions", help="write per-image top-5 to this CSV file (an existing "
                                         "file is overwritten)")
    p.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="evaluate the share of each class held out of DIR's training images "
                        "(DIR/train/ or DIR/<wnid>/, no val/), as train.py's data.val_split "
                        "does; default: the split the checkpoint's run held out, when DIR is "
                        "that run's data without a val split of its own")
    p.add_argument("--seed", type=int, help="with --val-split: the run's seed, which drew the "
                                            "split (default: the checkpoint's, else 0)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (sorted order)")
    p.add_argument("--verbose", action="store_true", help="tracebacks and debug logging")
    args = p.parse_args(argv)
    for name in ("img_size", "batch_size", "limit"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise CspxError(f"--{name.replace('_', '-')}: must be > 0, got {v}")
    if args.workers < 0:
        raise CspxError(f"--workers: must be >= 0, got {args.workers}")
    if args.val_split is not None and not 0.0 < args.val_split < 1.0:
        raise CspxError(f"--val-split: must be in (0, 1), got {args.val_split}")
    if args.seed is not None and args.val_split is None:
        raise CspxError("--seed: only with --val-split (it is the seed that drew the split)")
    if args.seed is not None and args.seed < 0:
        raise CspxError(f"--seed: must be >= 0, got {args.seed}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise CspxError(f"--crop-pct: must be in (0, 1], got {args.crop_pct}")
    return args


def _main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from cspx.eval_checkpoint import run
    run(args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
