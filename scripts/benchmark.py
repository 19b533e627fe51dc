"""cspx benchmarks. Each mode prints a table last; --json writes the figures.

  model       forward+backward+step on device tensors over batch/precision/channels_last/compile
  loader      the DALI and torch training loaders alone on a folder of real JPEGs
  train       full trainer steps with the real loader vs synthetic data, and the plain-PyTorch
              baseline (ImageFolder + PIL + DataLoader + autocast + SGD) in the same run
  baseline    same as train (the baseline is always measured beside cspx, so ratios hold)
  validate    evaluation img/s per loader
  overhead    the trainer's step time vs a bare loop on the same model, batch and tensors
  checkpoint  saving model + SGD momentum + EMA: cspx's atomic writer vs a bare torch.save
  augment     each RandAugment op's CPU cost per image, DALI vs torchvision on PIL (--batch images)
  memory      host memory (trainer + workers) at every epoch boundary of a long train.py run,
              per loader (default recipe: the demo; --epochs, default 30)
  shards      sharded dataset vs loose files: startup, loader img/s, copy (cspx/bench/shards.py)

Examples:
  python scripts/benchmark.py overhead --model cspresnext50 --batch 32
  python scripts/benchmark.py loader --data ../shared/imagenet-sample/val --workers 2
  python scripts/benchmark.py train --make-data 2000 --model cspresnext_tiny --img-size 128
  python scripts/benchmark.py checkpoint --out-dir /data/runs/bench
  python scripts/benchmark.py memory --epochs 30 --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cspx.errors import CspxError, run_cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "imagenet-sample", "val")


def flag_list(kind):
    return lambda s: [kind(x) for x in s.split(",")]


def bools(s):
    return {"on": [True], "off": [False], "both": [False, True]}[s]


def parse(argv):
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["model", "loader", "train", "baseline", "validate", "overhead",
                                    "checkpoint", "augment", "memory", "shards"])
    p.add_argument("--recipe", help="augmentations, optimizer and loss come from here (default: "
                   "recipes/cspresnext50_ra.yaml; the memory mode: recipes/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set aug.randaugment_ops=0 (repeatable)")
    p.add_argument("--model", default="cspresnext50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off for CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=10, help="steps (or batches) per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    p.add_argument("--data", help="ImageNet-layout folder of JPEGs (default: the shared sample)")
    p.add_argument("--make-data", type=int, metavar="N",
                   help="generate N JPEGs of ImageNet size (~500x375, q90) and use them")
    p.add_argument("--loader", default="auto", choices=["auto", "torch", "dali"], help="train mode")
    p.add_argument("--loaders", type=flag_list(str), default=["dali", "torch"], help="loader/validate")
    p.add_argument("--batch-sizes", type=flag_list(int), default=[32, 64], help="model mode")
    p.add_argument("--precisions", type=flag_list(str), default=["fp32", "bf16"], help="model mode")
    p.add_argument("--channels-last-grid", type=bools, default=[False, True], metavar="{on,off,both}")
    p.add_argument("--compile-grid", type=bools, default=[False], metavar="{on,off,both}")
    p.add_argument("--out-dir", help="checkpoint mode: the disk to write to (default: a temp dir)")
    p.add_argument("--epochs", type=int, default=30, help="memory mode: epochs per loader")
    p.add_argument("--timeout", type=float, default=3600, help="memory mode: seconds per loader")
    p.add_argument("--json", help="write the results here (an existing file is overwritten)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    a.recipe_given = a.recipe is not None
    a.recipe = a.recipe or os.path.join(ROOT, "recipes", "cspresnext50_ra.yaml")
    import torch
    if a.channels_last is None:
        a.channels_last = a.device != "cpu" and torch.cuda.is_available()
    return a


def _data(args):
    if args.make_data:
        from cspx.bench.common import make_jpegs
        from cspx.data.index import cache_dir
        folder = os.path.join(cache_dir(), f"bench-jpegs-{args.make_data}")
        t = time.time()
        make_jpegs(folder, args.make_data)
        print(f"data: {args.make_data} JPEGs in {folder} ({time.time() - t:.0f} s)", file=sys.stderr)
        return folder
    if args.data:
        return args.data
    if os.path.isdir(SAMPLE):
        return SAMPLE
    raise CspxError(f"--data: no folder given and the ImageNet sample {SAMPLE} is absent; "
                    f"pass --data DIR or --make-data N")


def main(argv):
    args = parse(argv)
    import torch
    from cspx.bench import augment, common, io, memory, shards, steps
    from cspx.runlog import provenance, format_provenance
    if args.mode in ("loader", "train", "baseline", "validate", "augment"):
        args.data = _data(args)
    fn = {"model": steps.model, "overhead": steps.overhead, "train": steps.train,
          "baseline": steps.train, "loader": io.loader, "validate": io.validate,
          "checkpoint": io.checkpoint, "augment": augment.augment, "memory": memory.memory,
          "shards": shards.bench}[args.mode]
    dev = steps.device_of(args)
    prov = provenance(dev)
    print("benchmark " + args.mode + "\n" + format_provenance(prov), file=sys.stderr)
    rows, extra = fn(args)
    summary = {k: v for k, v in extra.items() if k != "raw"}
    batch = "" if args.mode == "model" else f" batch {args.batch}"
    title = (f"{args.mode}: {args.model}{batch} at {args.img_size} px on "
             f"{prov['device']}, torch {torch.__version__}")
    if args.json:
        common.write_json(args.json, {"mode": args.mode, "args": {k: v for k, v in vars(args).items()},
                                      "provenance": prov, "rows": rows, **extra})
    print(common.table(rows, title))
    for k, v in summary.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
