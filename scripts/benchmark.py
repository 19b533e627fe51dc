"""cspx benchmarks. Each mode prints a table last; --json writes the figures (rewritten after
every measured row, with "complete": false until the mode finishes).

  model       forward+backward+step on device tensors over batch/precision/channels_last/compile
  loader      the DALI and torch training loaders alone on a folder of real JPEGs
  train       full trainer steps with the real loader vs synthetic data, and the plain-PyTorch
              baseline (ImageFolder + PIL + DataLoader + autocast + SGD) in the same run, per
              batch size (--batch-sizes) and compile mode (--compile-modes)
  baseline    same as train (the baseline is always measured beside cspx, so ratios hold)
  validate    evaluation img/s per loader
  overhead    the trainer's step time vs a bare loop on the same model, batch and tensors
  checkpoint  saving model + SGD momentum + EMA: cspx's atomic writer vs a bare torch.save;
              verifying the file's checksums (CRC32) vs torch.load
  augment     each RandAugment op's CPU cost per image, DALI vs torchvision on PIL (--batch images)
  memory      host memory (trainer + workers) at every epoch boundary of a long train.py run,
              per loader (default recipe: the demo; --epochs, default 30)
  shards      sharded dataset vs loose files: startup, loader img/s, copy (cspx/bench/shards.py)
  evaldiff    DALI's evaluation images against PIL's on the same JPEGs, and probe top-1 agreement
  finetune    transfer: the demo's model pretrained on the demo task, fine-tuned with
              recipes/finetune.yaml on another synthetic task, beside the same model from scratch
              on the same --steps (cspx/bench/transfer.py); accuracies are deterministic on CPU
  peer        cspx's train.py and validate.py against timm's own, from a checkout of timm's
              repository (--timm-src), equivalent settings, whole processes (cspx/bench/peer.py)

Examples:
  python scripts/benchmark.py overhead --model cspresnext50 --batch 32
  python scripts/benchmark.py loader --data ../shared/imagenet-sample/val --workers 2
  python scripts/benchmark.py train --make-data 2000 --model cspresnext_tiny --img-size 128
  python scripts/benchmark.py model --batch-sizes 128,256 --precisions bf16 \\
      --channels-last-grid on --compile-modes eager,default,reduce-overhead
  python scripts/benchmark.py checkpoint --out-dir /data/runs/bench
  python scripts/benchmark.py memory --epochs 30 --workers 2
  python scripts/benchmark.py finetune --steps 150 --workers 2
  python scripts/benchmark.py peer --timm-src ../pytorch-image-models --batch 16 --workers 2
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from cspx.errors import CspxError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mode -> "module:function"; the function takes the parsed args and returns (rows, extra)
MODES = {
    "model": "cspx.bench.steps:model",
    "loader": "cspx.bench.io:loader",
    "train": "cspx.bench.steps:train",
    "baseline": "cspx.bench.steps:train",
    "validate": "cspx.bench.io:validate",
    "overhead": "cspx.bench.steps:overhead",
    "checkpoint": "cspx.bench.io:checkpoint",
    "augment": "cspx.bench.augment:augment",
    "evaldiff": "cspx.bench.evaldiff:evaldiff",
    "memory": "cspx.bench.memory:memory",
    "shards": "cspx.bench.shards:bench",
    "finetune": "cspx.bench.transfer:finetune",
    "peer": "cspx.bench.peer:peer",
}
NEEDS_DATA = ("loader", "train", "baseline", "validate", "augment", "evaldiff",
              "peer")
COMPILE_MODES = ("eager", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")


def flag_list(kind):
    return lambda s: [kind(x) for x in s.split(",")]


def bools(s):
    return {"on": [True], "off": [False], "both": [False, True]}[s]


def compile_modes(s):
    modes = s.split(",")
    for m in modes:
        if m not in COMPILE_MODES:
            raise argparse.ArgumentTypeError(f"{m!r} is not one of {', '.join(COMPILE_MODES)}")
    return modes


def parse(argv):
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("--recipe", help="augmentations, optimizer and loss come from here (default: "
                   "recipes/cspresnext50_ra.yaml; the memory mode: recipes/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set aug.randaugment_ops=0 (repeatable)")
    p.add_argument("--model", help="default: cspresnext50 (finetune: the demo's model)")
    p.add_argument("--batch", type=int, help="default: 32 (finetune: the demo's 64)")
    p.add_argument("--img-size", type=int, help="default: 224 (finetune: the demo's 64)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off for CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, help="steps (or batches) per timed round (default 10); "
                   "finetune: the steps of each run on the new task (default 150)")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating rounds; medians are reported (evaldiff: probe seeds)")
    p.add_argument("--warmup", type=int, default=3,
                   help="steps (loader: batches) before timing, whatever the worker count")
    p.add_argument("--data", help="ImageNet-layout folder of JPEGs (default: the shared sample; "
                   "finetune: the demo set, generated into the cache when not given)")
    p.add_argument("--make-data", type=int, metavar="N",
                   help="generate N JPEGs of ImageNet size (~500x375, q90) and use them")
    p.add_argument("--loader", default="auto", choices=["auto", "torch", "dali"], help="train mode")
    p.add_argument("--loaders", type=flag_list(str), default=["dali", "torch"],
                   help="loader mode: dali, dali-copy, dali-zerocopy, torch; validate: dali, torch")
    p.add_argument("--batch-sizes", type=flag_list(int),
                   help="model mode (default 32,64) and train mode (default: --batch)")
    p.add_argument("--precisions", type=flag_list(str), default=["fp32", "bf16"], help="model mode")
    p.add_argument("--channels-last-grid", type=bools, default=[False, True],
                   metavar="{on,off,both}")
    p.add_argument("--compile-modes", type=compile_modes, default=["eager"],
                   help="model and train modes: comma list of " + ", ".join(COMPILE_MODES))
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (aot_eager rehearses compiling on a CPU)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="train mode: measure the plain-PyTorch baseline too")
    p.add_argument("--out-dir", help="checkpoint and peer modes: the disk to write to; a "
                   "temporary folder is made inside it and removed at the end (default: the "
                   "system's temp dir)")
    p.add_argument("--epochs", type=int, default=30, help="memory mode: epochs per loader")
    p.add_argument("--pretrain-steps", type=int,
                   help="finetune: steps on the demo task (default: the demo recipe's 500)")
    p.add_argument("--per-class", type=int, default=100,
                   help="finetune: training images per class of the new task")
    p.add_argument("--evals", type=int, default=10, help="finetune: evaluations per run")
    p.add_argument("--shape-only", action="store_true",
                   help="finetune: the new task's shapes in random colours (default: each class "
                   "in a colour band of its own, as in the demo)")
    p.add_argument("--timeout", type=float, default=3600, help="memory mode: seconds per loader")
    p.add_argument("--timm-src", metavar="DIR", help="peer mode: a checkout of timm's repository "
                   "(git clone https://github.com/huggingface/pytorch-image-models)")
    p.add_argument("--lengths", type=flag_list(int), default=[4, 12], metavar="SHORT,LONG",
                   help="peer mode: two training run lengths in steps (multiples of 64 images / "
                   "--batch); a step's cost is their difference")
    p.add_argument("--settings", type=flag_list(str), default=["plain", "recipe"],
                   help="peer mode: plain (no RandAugment; timm --color-jitter 0) and/or recipe "
                   "(the recipe's RandAugment; timm --aa rand-mM-nN)")
    p.add_argument("--breakdown", action="store_true", help="peer mode: also time one step of "
                   "each, part by part, on one thread (--steps steps; cspx/bench/peer_steps.py)")
    p.add_argument("--json", help="write the results here (an existing file is overwritten)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    _mode_defaults(a)
    if a.batch_sizes is None:
        a.batch_sizes = [32, 64] if a.mode == "model" else [a.batch]
    for name in ("batch", "steps", "rounds", "img_size", "per_class", "evals"):
        if getattr(a, name) <= 0:
            raise CspxError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(a, name)}")
    if a.warmup < 0 or min(a.batch_sizes) <= 0:
        raise CspxError("--warmup and --batch-sizes: must be >= 0 and > 0")
    if a.mode == "peer":
        from cspx.bench.peer import check_checkout
        check_checkout(a.timm_src)  # first: the one thing the mode cannot do without
    a.recipe_given = a.recipe is not None
    a.recipe = a.recipe or os.path.join(ROOT, "recipes", "cspresnext50_ra.yaml")
    import torch
    if a.channels_last is None:
        a.channels_last = a.device != "cpu" and torch.cuda.is_available()
    return a


def _mode_defaults(a):
    """--model, --batch, --img-size and --steps where not given: the finetune mode's come from
    the demo recipe (its model, batch and image size), the others' are fixed."""
    if a.mode == "finetune":
        import yaml
        demo = yaml.safe_load(open(os.path.join(ROOT, "recipes", "demo.yaml"), encoding="utf-8"))
        fixed = dict(model=demo["model"]["name"], batch=demo["train"]["batch_size"],
                     img_size=demo["aug"]["img_size"], steps=150)
    else:
        fixed = dict(model="cspresnext50", batch=32, img_size=224, steps=10)
    for k, v in fixed.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.pretrain_steps is not None and a.pretrain_steps <= 0:
        raise CspxError(f"--pretrain-steps: must be > 0, got {a.pretrain_steps}")


def _data(args):
    from cspx.bench.common import make_jpegs, sample_root
    if args.make_data:
        from cspx.data.index import cache_dir
        folder = os.path.join(cache_dir(), f"bench-jpegs-{args.make_data}")
        t = time.time()
        make_jpegs(folder, args.make_data)
        print(f"data: {args.make_data} JPEGs in {folder} ({time.time() - t:.0f} s)",
              file=sys.stderr)
        return folder
    if args.data:
        return args.data
    sample = os.path.join(sample_root(), "val")
    if os.path.isdir(sample):
        return sample
    raise CspxError(f"--data: no folder given and the ImageNet sample {sample} is absent; "
                    f"pass --data DIR or --make-data N")


def main(argv):
    args = parse(argv)
    import torch

    from cspx.bench.common import Report, table
    from cspx.bench.steps import device_of
    from cspx.runlog import format_provenance, provenance
    if args.mode in NEEDS_DATA:
        args.data = _data(args)
    module, name = MODES[args.mode].split(":")
    fn = getattr(importlib.import_module(module), name)
    dev = device_of(args)
    prov = provenance(dev)
    print("benchmark " + args.mode + "\n" + format_provenance(prov), file=sys.stderr)
    args.report = Report(args.json, {"mode": args.mode, "args": dict(vars(args)),
                                     "provenance": prov})
    rows, extra = fn(args)
    args.report.finish(rows, extra)
    summary = {k: v for k, v in extra.items() if k not in ("raw", "breakdown")}
    batch = "" if args.mode in ("model", "train", "baseline") else f" batch {args.batch}"
    title = (f"{args.mode}: {args.model}{batch} at {args.img_size} px on "
             f"{prov['device']}, torch {torch.__version__}")
    print(table(rows, title))
    for k, v in summary.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {', '.join(f'{k}={v}' for k, v in r.items() if k != 'error')}: "
              f"{r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
