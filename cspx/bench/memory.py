"""The `memory` benchmark: host memory of a long run, epoch after epoch, with each loader.

Runs last days, and DALI users have reported host memory that grows epoch after epoch. This
runs the real command (`train.py --recipe ...`) for `--epochs` epochs of the recipe (the demo by
default) with each loader, and sums the memory of the trainer and all its descendants
(DataLoader workers): the PSS of their anonymous and shared-memory pages from
/proc/<pid>/smaps_rollup (pages the workers share with the trainer count once; libraries and
other file-backed pages are left out, see _memory_kb), else RSS. Every epoch ends with an
evaluation, so its loader starts in epoch 1, inside the warm-up. Memory is read every POLL
seconds, and an epoch's figure is the median of its readings: a single reading lands at a random
point of a step, where the batches and activations in flight move it by several percent. A run
is flat when, after its first two epochs (allocator warm-up, worker start, the first
evaluation), every later epoch stays within 5% of epoch 2.

The run folder is a temporary folder this benchmark creates and removes; the dataset is the
recipe's (the demo set is generated once, as train.py does).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

from cspx.config import load_config
from cspx.errors import CspxError, last_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAT_AFTER = 2        # epochs of warm-up before memory must be flat
TOLERANCE = 0.05      # flat: within 5% of the epoch-FLAT_AFTER sample
POLL = 0.25           # seconds between readings


def _children(pid: int) -> List[int]:
    out: List[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def tree_memory_mb(pid: int) -> float:
    """PSS (else RSS) of `pid` and every descendant, in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _memory_kb(p)
            todo += _children(p)
        except OSError:  # a worker that just exited
            continue
    return total / 1024


def _memory_kb(pid: int) -> int:
    """The memory a process allocated, in KiB: its anonymous and shared-memory pages, PSS (a
    page shared by n processes counts 1/n in each). File-backed pages are left out: they are
    libraries and mapped files, reclaimable page cache whose PSS also moves whenever any other
    process on the machine maps the same library, which is not the run's doing."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
        if "Pss_Anon" in fields:
            return sum(int(fields[k].split()[0]) for k in ("Pss_Anon", "Pss_Shmem") if k in fields)
        return int(fields["Pss"].split()[0])
    except (OSError, KeyError, ValueError):
        pass
    with open(f"/proc/{pid}/status") as f:  # a process that just exited has no VmRSS: 0
        return next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)


def measure(recipe: str, loader: str, epochs: int, workers: int, extra: List[str],
            timeout: float) -> List[Tuple[int, float]]:
    """[(epoch, MiB)] sampled at each epoch boundary of a `train.py` run."""
    cfg = load_config(recipe, extra, check_paths=False)
    images = _train_images(cfg)
    per_epoch = images // cfg.train.batch_size  # steps per epoch on one rank, micro-batch = batch
    run_dir = tempfile.mkdtemp(prefix="cspx-bench-memory-")
    # one epoch more than sampled: the last epoch's sample would meet the process tearing down
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", recipe, *extra,
           f"run.dir={run_dir}", f"data.loader={loader}", f"data.workers={workers}",
           f"train.steps={per_epoch * (epochs + 1)}", f"run.log_every_steps={per_epoch}",
           f"eval.every_steps={per_epoch}", "run.tensorboard=false", "checkpoint.every_steps=0"]
    last = "eval_ema" if cfg.ema.enabled else "eval"  # the epoch's last record
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    samples: List[Tuple[int, float]] = []
    epoch_readings: List[float] = []  # this epoch's readings, every POLL seconds
    metrics = os.path.join(run_dir, "metrics.jsonl")
    seen, deadline = 0, time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            lines = _lines(metrics)
            epoch_readings.append(tree_memory_mb(proc.pid))
            for rec in lines[seen:]:
                if rec.get("kind") == last and rec["step"] <= per_epoch * epochs:
                    samples.append((round(rec["step"] / per_epoch),
                                    statistics.median(epoch_readings)))
                    epoch_readings = [tree_memory_mb(proc.pid)]
            seen = len(lines)
            time.sleep(POLL)
        if proc.poll() is None:
            proc.kill()
            raise CspxError(f"memory benchmark: the {loader} run did {len(samples)} of {epochs} "
                            f"epochs in --timeout {timeout:.0f} s; raise --timeout")
        if proc.returncode != 0:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise CspxError(f"memory benchmark: the {loader} run failed: {last_line(err)}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)  # made by mkdtemp above
    return samples


def _train_images(cfg) -> int:
    from cspx.data import synthetic
    from cspx.data.build import classes_file
    from cspx.data.index import build_index, read_classes_file
    root = os.path.expanduser(cfg.data.root)
    if cfg.data.synthetic:
        synthetic.generate(root)
    listed = classes_file(cfg)
    return len(build_index(os.path.join(root, "train"),
                           read_classes_file(listed) if listed else None, warn=False))


def _lines(path: str) -> List[Dict]:
    try:
        with open(path) as f:
            return [json.loads(ln) for ln in f if ln.endswith("\n")]
    except OSError:
        return []


def growth(samples: List[Tuple[int, float]]) -> Optional[float]:
    """Largest departure, in %, of the samples after epoch FLAT_AFTER from the epoch-FLAT_AFTER
    one; None when the run has no later sample."""
    base = next((mb for e, mb in samples if e >= FLAT_AFTER), None)
    later = [mb for e, mb in samples if e > FLAT_AFTER]
    if base is None or not later:
        return None
    return 100.0 * max(abs(mb - base) for mb in later) / base


def memory(args: Namespace) -> Tuple[List[Dict], Dict]:
    recipe = args.recipe if args.recipe_given else os.path.join(ROOT, "recipes", "demo.yaml")
    rows: List[Dict] = []
    extra: Dict[str, Any] = {}  # per loader: growth (%) and its (epoch, MiB) samples
    for loader in args.loaders:
        samples = measure(recipe, loader, args.epochs, args.workers, args.set,
                          timeout=args.timeout)
        g = growth(samples)
        extra[f"{loader}_growth_pct"] = g if g is not None else math.nan
        base = next((mb for e, mb in samples if e >= FLAT_AFTER), math.nan)
        rows.append({"loader": loader, "epochs": len(samples),
                     "MiB at epoch 1": samples[0][1] if samples else math.nan,
                     f"MiB at epoch {FLAT_AFTER}": base,
                     "MiB at the end": samples[-1][1] if samples else math.nan,
                     "max change after epoch 2 (%)": extra[f"{loader}_growth_pct"],
                     "flat (within 5%)": g is not None and g <= 100 * TOLERANCE})
        extra[f"{loader}_samples"] = samples
    return rows, extra
