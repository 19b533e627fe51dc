"""Benchmark (scripts/benchmark.py finetune): proof that transfer works, on a CPU.

1. pretrained   recipes/demo.yaml on the demo task (ten shapes, each in a colour band of its own)
                for --pretrain-steps steps (default: the demo's 500).
2. fine-tuned   that model, its classifier replaced, on another task from the same generator:
                eight shapes the demo never shows, each in a colour band of its own as the
                demo's classes are (with --shape-only: in random colours, so that only the shape
                tells the class); --per-class training images per class, 30 for evaluation.
                recipes/finetune.yaml's optimizer, schedule, label smoothing, EMA and freeze;
                its warmup, freeze and EMA horizon keep their share of the run.
3. scratch, fine-tune settings   the same run from a random initialisation: the difference to
                2 is the initial weights alone.
4. scratch, demo recipe   the same model from a random initialisation with the demo's own
                from-scratch recipe (SGD, LR 0.1, darknet poly with its burn-in scaled likewise):
                the recipe that trains this model from nothing.

Runs 2 to 4 train for the same --steps with the demo's model, image size, augmentation and
batch, evaluating --evals times along the way. Each row gives the final top-1 and top-5 of the
model and of its EMA, and the top-1 curve; `raw` holds every evaluation. On a CPU every figure
is deterministic for a given machine (its kernels' rounding), so accuracies can be published
from any run; the seconds are the machine's load as much as the work.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from typing import Dict, List, Tuple

import yaml

from cspx.config import load_config
from cspx.data.index import cache_dir
from cspx.data.synthetic import generate
from cspx.errors import CspxError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "recipes", "demo.yaml")
FINETUNE = os.path.join(REPO, "recipes", "finetune.yaml")
# the transfer task: SHAPES[10:18] (dots ... hourglass), 30 evaluation images per class
TASK = dict(num_classes=8, val_per_class=30, seed=1, first_shape=10)
# what the demo recipe fixes about the data and the model, for every run of the comparison
DEMO_KEYS = ("model.name", "model.channels_last", "aug.", "eval.", "train.batch_size",
             "train.precision", "data.loader")


def _demo_overrides(args: Namespace) -> List[str]:
    """The demo recipe's model, data handling, augmentation and evaluation, as overrides."""
    flat = _flat(yaml.safe_load(open(DEMO, encoding="utf-8")))
    over = [f"{k}={json.dumps(v)}" for k, v in flat.items() if k.startswith(DEMO_KEYS)]
    return over + [f"model.name={args.model}", f"aug.img_size={args.img_size}",
                   f"eval.img_size={args.img_size}", f"train.batch_size={args.batch}"]


def _flat(d: Dict, prefix: str = "") -> Dict:
    out: Dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _share(recipe: str, steps: int) -> List[str]:
    """The recipe's warmup, burn-in, freeze and EMA horizon as the same share of `steps`."""
    cfg = load_config(recipe, ["data.root=.", "model.init_from=."], check_paths=False) \
        if recipe == FINETUNE else load_config(recipe, check_paths=False)
    n = cfg.train.steps
    def scale(k: int) -> int:
        return max(1, round(k * steps / n)) if k else 0
    horizon = (1.0 / (1.0 - cfg.ema.decay)) * steps / n   # steps the EMA averages over
    return [f"sched.warmup_steps={scale(cfg.sched.warmup_steps)}",
            f"sched.burn_in={scale(cfg.sched.burn_in)}",
            f"train.freeze_backbone_steps={scale(cfg.train.freeze_backbone_steps)}",
            f"ema.decay={max(0.5, 1.0 - 1.0 / max(horizon, 1.0))}"]


def _train(name: str, recipe: str, overrides: List[str], folder: str) -> Tuple[Dict, float]:
    """One run of train.py's trainer in this process, its log in <folder>/<name>.log."""
    from cspx.train_setup import train
    run_dir = os.path.join(folder, name)
    cfg = load_config(recipe, [*overrides, f"run.dir={run_dir}", "run.tensorboard=false",
                               "checkpoint.every_steps=0"])
    print(f"finetune benchmark: {name} ({cfg.train.steps} steps), log in {run_dir}.log",
          file=sys.stderr, flush=True)
    t = time.perf_counter()
    with open(f"{run_dir}.log", "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    if not any(r["kind"] == "eval" and r["step"] == cfg.train.steps for r in records):
        raise CspxError(f"finetune benchmark: the {name} run stopped before step "
                        f"{cfg.train.steps} (a signal); no figures")
    return {"dir": run_dir, "records": records}, time.perf_counter() - t


def _row(name: str, init: str, settings: str, run: Dict, seconds: float) -> Dict:
    ev = [r for r in run["records"] if r["kind"] == "eval"]
    ema = {r["step"]: r for r in run["records"] if r["kind"] == "eval_ema"}
    last = ev[-1]
    row = {"run": name, "init": init, "settings": settings, "steps": last["step"],
           "top-1 %": last["top1"], "top-5 %": last["top5"]}
    if last["step"] in ema:
        row["EMA top-1 %"] = ema[last["step"]]["top1"]
    row["top-1 by step"] = " ".join(f"{r['step']}:{r['top1']:.1f}" for r in ev)
    row["s"] = seconds
    return row


def finetune(args: Namespace) -> Tuple[List[Dict], Dict]:
    steps, per_class = args.steps, args.per_class
    every = max(1, steps // max(1, min(args.evals, steps)))
    demo_data = args.data or os.path.join(cache_dir(), "demo-data-v1")
    if not args.data:
        generate(demo_data)   # the demo's own set, kept for the next run
    colours = "random" if args.shape_only else "bands"
    task = generate(os.path.join(cache_dir(), f"transfer-data-v1-{colours}-{per_class}"),
                    train_per_class=per_class, colour_by_class=not args.shape_only, **TASK)
    common = [*_demo_overrides(args), f"data.workers={args.workers}", "data.synthetic=false"]
    folder = tempfile.mkdtemp(prefix="cspx-bench-finetune-", dir=args.out_dir)
    raw: Dict[str, List[Dict]] = {}
    rows: List[Dict] = []
    try:
        pre_over = [*common, f"data.root={demo_data}"]
        if args.pretrain_steps:
            pre_over += [f"train.steps={args.pretrain_steps}", *_share(DEMO, args.pretrain_steps)]
        pre, secs = _train("pretrained", DEMO, pre_over, folder)
        rows.append(args.report.row(_row("pretrained (demo task)", "random", "recipes/demo.yaml",
                                         pre, secs)))
        weights = os.path.join(pre["dir"], "checkpoints", "last.pt")
        on_task = [*common, f"data.root={task}", f"train.steps={steps}",
                   f"eval.every_steps={every}"]
        tuned = [*on_task, *_share(FINETUNE, steps)]
        runs = [("fine-tuned", FINETUNE, [*tuned, f"model.init_from={weights}"],
                 "demo task's weights", "recipes/finetune.yaml"),
                ("scratch, fine-tune settings", FINETUNE, [*tuned, "model.init_from=null"],
                 "random", "recipes/finetune.yaml"),
                ("scratch, demo recipe", DEMO, [*on_task, *_share(DEMO, steps)],
                 "random", "recipes/demo.yaml")]
        for name, recipe, over, init, settings in runs:
            run, secs = _train(name.replace(", ", "-").replace(" ", "-"), recipe, over, folder)
            raw[name] = [r for r in run["records"] if r["kind"] in ("eval", "eval_ema")]
            rows.append(args.report.row(_row(name, init, settings, run, secs)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)   # the folder made above, with the runs
    top1 = {r["run"]: r["top-1 %"] for r in rows}
    what = "in random colours" if args.shape_only else "each in a colour band of its own"
    extra = {"task": f"{TASK['num_classes']} new shapes {what}, {per_class} training and "
                     f"{TASK['val_per_class']} validation images per class",
             "gain_over_scratch_fine_tune_settings":
                 top1["fine-tuned"] - top1["scratch, fine-tune settings"],
             "gain_over_scratch_demo_recipe": top1["fine-tuned"] - top1["scratch, demo recipe"],
             "raw": raw}
    return rows, extra
