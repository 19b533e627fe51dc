"""The command line of predict.py and `cspx-predict`: `--checkpoint C PATH...`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cspx.errors import CspxError, run_cli

EPILOG = """\
PATH: an image file; a folder (its .jpg .jpeg .png .bmp .webp files, searched recursively); a
list of image paths (.txt or .lst, one per line, relative ones from the list's folder); or a
sharded dataset from scripts/make_shards.py (every split), or one split's folder in it.

output: one row per image, in the order of the PATHs; CSV columns path, error, class_1..class_K,
name_1..name_K, prob_1..prob_K (--out FILE.json: the same fields per image). An image that cannot
be read or decoded gets its reason in `error` and never stops the run. Classes: --classes, else a
cspx checkpoint's own class list, else ImageNet-1k's 1000 classes for 1000 outputs (timm's
weights); ImageNet wnids are named by their WordNet lemmas.
preprocessing: the model's evaluation preset, as validate.py (cspresnext50: 224 px, crop 0.875,
bilinear). multi-GPU: torchrun --nproc_per_node=8 predict.py ... (each image once).
exit status: 0 every image classified; 1 some could not be (their rows say why); 2 bad input.
  python predict.py --checkpoint cspresnext50_ra_224-648b4713.pth photos/ --out preds.csv
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="predict.py", description="Classify images: top-k classes "
                                "and probabilities per image.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image, folder, list file or shards")
    p.add_argument("--checkpoint", required=True, help="cspx checkpoint or a (timm) state_dict")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", help="write the rows to FILE.csv or FILE.json (default: CSV on "
                                 "stdout); replaces only a file predict.py wrote, unless --force")
    p.add_argument("--force", action="store_true", help="let --out replace any existing file")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average the softmax of each image and of its horizontal mirror "
                        "(two forward passes)")
    p.add_argument("--classes", help="class list naming the outputs: line k is 'id [name]' for "
                                     "output k (overrides the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--loader", choices=["torch", "dali"], default="torch",
                   help="torch (default): PIL decoding and resizing, as validate.py's default; "
                        "dali: DALI's, faster on a GPU (docs/dali.md)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--workers", type=int, default=8, help="decoding processes (DALI: threads)")
    p.add_argument("--model", help="architecture (default: from a cspx checkpoint, else "
                                   "cspresnext50)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--img-size", type=int, help="centre-crop side, px (default: the model's)")
    p.add_argument("--crop-pct", type=float, help="resize the shorter side to floor(img-size / "
                   "crop-pct) first (default: the model's)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"],
                   help="resize filter (default: the model's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype (default fp32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--verbose", action="store_true", help="tracebacks and debug logging")
    args = p.parse_args(argv)
    for name in ("img_size", "batch_size", "topk"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise CspxError(f"--{name.replace('_', '-')}: must be > 0, got {v}")
    if args.workers < 0:
        raise CspxError(f"--workers: must be >= 0, got {args.workers}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise CspxError(f"--crop-pct: must be in (0, 1], got {args.crop_pct}")
    if args.out is not None and not args.out.lower().endswith((".csv", ".json")):
        raise CspxError(f"--out: {args.out} must end in .csv or .json (the format written)")
    return args


def _main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from cspx.predict import run
    return run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
