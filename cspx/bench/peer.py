"""The `peer` benchmark: cspx's train.py and validate.py against timm's own train.py and
validate.py, run from a checkout of timm's repository (--timm-src DIR), with equivalent settings.

Each run is a whole process, as a user starts it: interpreter, imports, dataset scan, model,
loader workers, the steps, the final evaluation and checkpoint. The contenders alternate
(cspx, timm, cspx, timm, ...) over --rounds rounds and the medians are reported. Two run lengths
(--lengths, default 4 and 12 steps) give the marginal cost of a step: (long - short) / (steps
between them), which leaves out everything a run does once. Validation runs on 64 and on 128
images (the same 64 twice), which gives its marginal images/s the same way.

Settings (--settings): `plain` is the recipe without RandAugment (timm: --color-jitter 0);
`recipe` is the recipe as it is (RandAugment 2 ops at magnitude 7; timm: --aa rand-m7-n2).
Both sides get the same values, read from one cspx config (the recipe, --recipe, with the
overrides `cspx_overrides` lists); `timm_train_argv` maps every key that matters for the work
of a run to timm's flag and refuses what it does not map (cspx/bench/peer_args.py). What stays
different, because one tool cannot do what the other does, is listed in docs/performance.md
(Peer comparison).

Data: 64 images from --data (default: the ImageNet sample), one per class as far as the
classes go, copied into a scratch folder as train/ and val/ (the same images in both); the
scratch folder is made inside --out-dir (default: the system's temp dir) and removed at the end.
Every figure comes with the process tree's CPU time and minor page faults (getrusage of the
children, DataLoader workers included), which a busy machine disturbs far less than wall time.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from typing import Dict, List, Optional, Sequence, Tuple

from cspx.bench.peer_args import (
    IMAGES,
    ROOT,
    Peer,
    cspx_overrides,
    cspx_train_argv,
    cspx_validate_argv,
    timm_train_argv,
    timm_validate_argv,
)
from cspx.errors import CspxError, last_line

CLONE = "git clone https://github.com/huggingface/pytorch-image-models"
SETTINGS = ("plain", "recipe")
TIMM_MODELS = ("cspresnext50", "cspresnet50", "cspdarknet53")  # cspx models timm also has
IMAGE_EXTS = (".jpeg", ".jpg", ".png")


def check_checkout(src: Optional[str]) -> str:
    """The timm checkout's version (from timm/version.py, read, not imported); one clear error
    when `src` is not given, missing, or not a checkout of timm's repository."""
    if not src:
        raise CspxError(f"--timm-src: the peer mode runs timm's own train.py and validate.py from "
                        f"a checkout of timm's repository; get one with `{CLONE}` and pass "
                        f"--timm-src pytorch-image-models")
    if not os.path.isdir(src):
        raise CspxError(f"--timm-src {src}: no such folder; get a checkout with `{CLONE}`")
    version_file = os.path.join(src, "timm", "version.py")
    needed = [os.path.join(src, "train.py"), os.path.join(src, "validate.py"), version_file]
    if not all(os.path.isfile(p) for p in needed):
        raise CspxError(f"--timm-src {src}: not a checkout of timm's repository (it needs "
                        f"train.py, validate.py and timm/version.py); get one with `{CLONE}`")
    with open(version_file) as f:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read())
    if not m:
        raise CspxError(f"--timm-src {src}: {version_file} names no __version__")
    return m.group(1)


# ----- data ---------------------------------------------------------------------------------------
def pick_images(source: str, n: int = IMAGES) -> List[Tuple[str, str]]:
    """n (class folder, file) pairs from `source` (class folders, or a root with train/):
    one image of each class in turn, classes and files in sorted order."""
    if os.path.isdir(os.path.join(source, "train")):
        source = os.path.join(source, "train")
    if not os.path.isdir(source):
        raise CspxError(f"--data {source}: no such folder")
    per_class = []
    for c in sorted(os.listdir(source)):
        folder = os.path.join(source, c)
        if os.path.isdir(folder):
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
            if files:
                per_class.append([(c, os.path.join(folder, f)) for f in files])
    picked: List[Tuple[str, str]] = []
    depth = 0
    while len(picked) < n and any(len(files) > depth for files in per_class):
        picked += [files[depth] for files in per_class if len(files) > depth][:n - len(picked)]
        depth += 1
    if len(picked) < n:
        raise CspxError(f"--data {source}: the peer mode needs {n} images in class folders, "
                        f"found {len(picked)}")
    return picked


def build_data(source: str, scratch: str, n: int = IMAGES) -> Tuple[str, str, int]:
    """(data root with train/ and val/, a folder of the same images twice, classes)."""
    picked = pick_images(source, n)
    root, twice = os.path.join(scratch, "data"), os.path.join(scratch, "val-twice")
    for c, path in picked:
        name = os.path.basename(path)
        for folder, copies in ((os.path.join(root, "train", c), [name]),
                               (os.path.join(root, "val", c), [name]),
                               (os.path.join(twice, c), [name, "copy2-" + name])):
            os.makedirs(folder, exist_ok=True)
            for copy in copies:
                shutil.copyfile(path, os.path.join(folder, copy))
    return root, twice, len({c for c, _ in picked})


# ----- running ------------------------------------------------------------------------------------
def timed(argv: Sequence[str], env: Dict[str, str], cwd: str, who: str) -> Dict[str, float]:
    """Run one whole process: wall seconds, and its tree's CPU seconds and minor page faults
    (getrusage of the children: a process's figures include the children it waited for, here
    its DataLoader workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(list(argv), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise CspxError(f"peer benchmark: {who} failed (exit {proc.returncode}): "
                        f"{last_line(proc.stderr)}")
    return {"wall": wall,
            "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "faults": float(after.ru_minflt - before.ru_minflt)}


def environments(src: str) -> Dict[str, Dict[str, str]]:
    """Each side imports its own package: cspx this checkout, timm its checkout's timm
    (PYTHONPATH, which also comes first for a script's own folder's package)."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"cspx": {**base, "PYTHONPATH": ROOT}, "timm": {**base, "PYTHONPATH": src}}


def timm_package(src: str, env: Dict[str, str]) -> Tuple[str, str]:
    """(version, file) of the timm package timm's scripts import under `env`: it must be the
    checkout's own, so its scripts and library agree."""
    r = subprocess.run([sys.executable, "-c", "import timm; print(timm.__version__); "
                        "print(timm.__file__)"], env=env, cwd=src, capture_output=True, text=True)
    if r.returncode != 0:
        raise CspxError(f"--timm-src {src}: its timm package does not import: "
                        f"{last_line(r.stderr)}")
    version, path = r.stdout.split()[-2:]
    if not os.path.realpath(path).startswith(os.path.realpath(src) + os.sep):
        raise CspxError(f"--timm-src {src}: timm's scripts would import timm from {path}, not "
                        f"from the checkout")
    return version, path


# ----- the mode -----------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _fill(row: Dict, cspx: List[Dict[str, float]], timm: List[Dict[str, float]],
          per: float = 1.0) -> None:
    """Medians over rounds into `row`: wall (divided by `per`), CPU and faults, each side."""
    from cspx.bench.common import median
    for name, runs in (("cspx", cspx), ("timm", timm)):
        row[name] = median([r["wall"] / per for r in runs])
        row[f"{name} CPU s"] = median([r["cpu"] / per for r in runs])
        row[f"{name} faults"] = median([r["faults"] / per for r in runs])
    row["time cspx / timm"] = _ratio(row["cspx"], row["timm"])
    row["rounds"] = len(cspx)


def _difference(long: List[Dict[str, float]], short: List[Dict[str, float]]):
    """Per round: what the long run cost beyond the short one."""
    return [{k: a[k] - b[k] for k in a} for a, b in zip(long, short)]


def peer(args: Namespace) -> Tuple[List[Dict], Dict]:
    import torch

    from cspx.bench.steps import device_of
    from cspx.config import load_config
    from cspx.models import create_model
    check_checkout(args.timm_src)
    src = os.path.abspath(args.timm_src)
    envs = environments(src)
    timm_version, timm_file = timm_package(src, envs["timm"])
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad or not args.settings:
        raise CspxError(f"--settings: {', '.join(bad) or 'none'}; choose from "
                        f"{', '.join(SETTINGS)}")
    short, long = sorted(set(args.lengths))[:2] if len(set(args.lengths)) == 2 else (0, 0)
    if not 0 < short < long:
        raise CspxError(f"--lengths: two different run lengths in steps, e.g. 4,12; got "
                        f"{','.join(map(str, args.lengths))}")
    if args.model not in TIMM_MODELS:
        raise CspxError(f"--model {args.model}: timm has no such model; choose from "
                        f"{', '.join(TIMM_MODELS)}")
    if args.set:
        raise CspxError("--set: the peer mode sets both sides from the recipe alone; pass a "
                        "recipe of your own with --recipe instead")
    device = device_of(args).type
    if args.breakdown and device != "cpu":
        raise CspxError("--breakdown: times one CPU thread's work part by part; on a GPU the parts "
                        "overlap asynchronously. Run it with --device cpu")
    fp = "fp32" if args.precision == "auto" else args.precision  # the comparison's: fp32
    peers = {s: Peer(recipe=os.path.abspath(args.recipe), setting=s, model=args.model,
                     batch=args.batch, img_size=args.img_size, workers=args.workers,
                     device=device, precision=fp, channels_last=args.channels_last)
             for s in args.settings}
    scratch = tempfile.mkdtemp(prefix="cspx-bench-peer-", dir=args.out_dir)
    try:
        data, twice, classes = build_data(args.data, scratch)
        weights = os.path.join(scratch, "weights.pth")
        torch.manual_seed(0)
        torch.save(create_model(args.model, num_classes=classes).state_dict(), weights)
        commands: Dict[Tuple[str, int], Dict[str, List[str]]] = {}
        for s, p in peers.items():
            for n in (short, long):
                run_dir = os.path.join(scratch, "runs", f"cspx-{s}-{n}")
                cfg = load_config(p.recipe, cspx_overrides(p, data, run_dir, n), check_paths=False)
                commands[(s, n)] = {
                    "cspx": cspx_train_argv(p, data, run_dir, n),
                    "timm": timm_train_argv(cfg, p, src, data, os.path.join(scratch, "timm"),
                                            f"{s}-{n}", n, classes)}
        p0 = next(iter(peers.values()))
        validate = {n: {"cspx": cspx_validate_argv(p0, weights, folder),
                        "timm": timm_validate_argv(p0, src, weights, folder, classes)}
                    for n, folder in ((IMAGES, os.path.join(data, "val")), (2 * IMAGES, twice))}
        runs: Dict[Tuple, List[Dict[str, float]]] = {}
        row_of: Dict[Tuple, Dict] = {}
        for s in peers:
            for n in (short, long):
                row_of[(s, n)] = args.report.row({"setting": s, "run": f"train.py, {n} steps",
                                                  "unit": "s"})
            row_of[(s, "step")] = args.report.row({
                "setting": s, "run": f"a step: ({long} - {short} steps) / {long - short}",
                "unit": "s/step"})
        for n in validate:
            row_of[("val", n)] = args.report.row({"setting": "-", "run": f"validate.py, {n} "
                                                  f"images", "unit": "s"})
        row_of[("val", "ips")] = args.report.row({
            "setting": "-", "run": f"validation: {IMAGES} / ({2 * IMAGES} - {IMAGES} images)",
            "unit": f"s per {IMAGES} images"})
        rows = list(row_of.values())

        def go(key: Tuple, tool: str, argv: List[str], label: str) -> None:
            runs.setdefault(key + (tool,), []).append(
                timed(argv, envs[tool], scratch, f"{tool}'s {label}"))
            for leftover in (os.path.join(scratch, "runs"), os.path.join(scratch, "timm")):
                shutil.rmtree(leftover, ignore_errors=True)  # this run's outputs, made here

        for _ in range(args.rounds):
            for s in peers:
                for n in (short, long):
                    for tool in ("cspx", "timm"):
                        go((s, n), tool, commands[(s, n)][tool], f"train.py ({s}, {n} steps)")
            for n in validate:
                for tool in ("cspx", "timm"):
                    go(("val", n), tool, validate[n][tool], f"validate.py ({n} images)")
            whole = [(s, n) for s in peers for n in (short, long)] + [("val", n) for n in validate]
            for key in whole:
                _fill(row_of[key], runs[key + ("cspx",)], runs[key + ("timm",)])
            for s in peers:
                cspx_d, timm_d = (_difference(runs[(s, long, t)], runs[(s, short, t)])
                                  for t in ("cspx", "timm"))
                _fill(row_of[(s, "step")], cspx_d, timm_d, per=long - short)
            _fill(row_of[("val", "ips")],
                  *(_difference(runs[("val", 2 * IMAGES, t)], runs[("val", IMAGES, t)])
                    for t in ("cspx", "timm")))
            args.report.flush()
        parts: List[Dict] = []
        if args.breakdown:
            from cspx.bench.common import table
            from cspx.bench.peer_steps import breakdown
            for s, p in peers.items():
                spec = {"recipe": p.recipe, "overrides": cspx_overrides(
                    p, data, os.path.join(scratch, "runs", "breakdown"), short)}
                parts += breakdown(s, spec, commands[(s, short)]["timm"], data, args.steps, envs)
            print(table(parts, f"one step, part by part: one thread's CPU ms and page faults, "
                               f"median of {args.steps} steps"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # made by mkdtemp above
    ips = row_of[("val", "ips")]
    extra = {"timm_src": src, "timm_src_version": timm_version, "timm_package": timm_file,
             "validation_img_per_s": {t: _ratio(IMAGES, ips[t]) for t in ("cspx", "timm")},
             "breakdown": parts,
             # every command run, and every run's figures (not printed: see --json)
             "raw": {"train": {f"{k[0]}, {k[1]} steps": v for k, v in commands.items()},
                     "validate": {f"{n} images": v for n, v in validate.items()},
                     "runs": {" ".join(map(str, k)): v for k, v in runs.items()}}}
    return rows, extra
