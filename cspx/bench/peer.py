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
of a run to timm's flag and refuses what timm cannot express. What stays different, because
one tool cannot do what the other does, is listed in docs/performance.md (Peer comparison).

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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from cspx.errors import CspxError, last_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLONE = "git clone https://github.com/huggingface/pytorch-image-models"
IMAGES = 64                     # training images, and validation images of the short run
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


@dataclass(frozen=True)
class Peer:
    """What both sides of one comparison share, from the benchmark's flags."""
    recipe: str
    setting: str          # "plain" or "recipe"
    model: str
    batch: int            # images per optimizer step
    img_size: int         # px, training and evaluation
    workers: int          # DataLoader workers, each side
    device: str           # "cpu" or "cuda"
    precision: str        # fp32, bf16 or fp16
    channels_last: bool


def cspx_overrides(p: Peer, data: str, run_dir: str, steps: int) -> List[str]:
    """The recipe keys the peer comparison sets on cspx's side. The burn-in goes (timm's poly
    schedule has a linear warm-up only; the time of a step does not depend on the LR), and
    evaluation and the checkpoint come once, at the end, as timm's are set to."""
    out = [f"data.root={data}", f"run.dir={run_dir}", "data.loader=torch",
           f"data.workers={p.workers}", f"run.device={p.device}", f"model.name={p.model}",
           f"model.channels_last={str(p.channels_last).lower()}", f"train.batch_size={p.batch}",
           f"train.steps={steps}", f"train.precision={p.precision}", f"aug.img_size={p.img_size}",
           f"eval.img_size={p.img_size}", f"eval.batch_size={p.batch}", "eval.every_steps=0",
           "checkpoint.every_steps=0", "sched.burn_in=0"]
    if p.setting == "plain":
        out.append("aug.randaugment_ops=0")
    return out


def cspx_train_argv(p: Peer, data: str, run_dir: str, steps: int) -> List[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", p.recipe,
            *cspx_overrides(p, data, run_dir, steps)]


def _num(x: float) -> str:
    """A flag value as timm's argparse reads it back: 7.0 -> '7', 0.005 -> '0.005'."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def timm_train_argv(cfg, p: Peer, src: str, data: str, out: str, name: str, steps: int,
                    classes: int, images: int = IMAGES) -> List[str]:
    """timm's train.py command for the same run as cspx's `cfg` (the config cspx_overrides
    gives). timm runs whole epochs of images // micro-batch steps, so `steps` must be a
    multiple of that; evaluation and checkpoint only after the last epoch (--val-interval)."""
    t, a, o, e = cfg.train, cfg.aug, cfg.optim, cfg.eval
    unsupported = [(a.hue, 0.0, "aug.hue"), (a.saturation, 1.0, "aug.saturation"),
                   (a.exposure, 1.0, "aug.exposure"), (a.rotate, 0.0, "aug.rotate"),
                   (cfg.model.compile, False, "model.compile"),
                   (cfg.model.sync_bn, False, "model.sync_bn")]
    for value, neutral, key in unsupported:
        if value != neutral:
            raise CspxError(f"{p.recipe}: {key}={value} has no equivalent in timm's train.py; the "
                            f"peer mode compares recipes without it")
    from cspx.models import eval_protocol
    ev = eval_protocol(cfg.model.name, img_size=e.img_size, crop_pct=e.crop_pct,
                       interpolation=e.interpolation)  # a recipe's null eval.* resolved
    if ev.img_size != a.img_size:
        raise CspxError(f"{p.recipe}: eval.img_size={ev.img_size} differs from aug.img_size="
                        f"{a.img_size}; timm's train.py evaluates at its training size")
    micro = t.batch_size // t.accum_steps
    per_epoch = images // micro
    if per_epoch == 0 or steps % per_epoch:
        raise CspxError(f"--lengths: timm's train.py runs whole epochs of {per_epoch} steps "
                        f"({images} images / batch {micro}); give multiples of {per_epoch}")
    epochs = steps // per_epoch
    argv = [sys.executable, os.path.join(src, "train.py"), "--data-dir", data,
            "--train-split", "train", "--val-split", "val", "--model", cfg.model.name,
            "--num-classes", str(cfg.model.num_classes or classes), "--img-size", str(a.img_size),
            "--device", p.device, "-b", str(micro), "--grad-accum-steps", str(t.accum_steps),
            "-vb", str(e.batch_size), "--workers", str(cfg.data.workers), "--no-prefetcher",
            # SGD: timm's "sgd" is Nesterov, "momentum" is plain momentum
            "--opt", "sgd" if o.nesterov else "momentum", "--lr", _num(o.lr),
            "--momentum", _num(o.momentum), "--weight-decay", _num(o.weight_decay),
            # poly decay over the run's updates, no warm-up: cspx's sched with burn_in 0
            "--sched", "poly", "--decay-rate", _num(cfg.sched.power), "--sched-on-updates",
            "--warmup-epochs", "0", "--min-lr", "0", "--epochs", str(epochs),
            "--smoothing", _num(t.label_smoothing),
            "--scale", _num(a.scale[0]), _num(a.scale[1]),
            "--ratio", _num(a.ratio[0]), _num(a.ratio[1]), "--hflip", _num(a.hflip),
            "--train-interpolation", a.interpolation,
            "--crop-pct", _num(ev.crop_pct), "--interpolation", ev.interpolation,
            "--val-interval", str(epochs), "--checkpoint-hist", str(cfg.checkpoint.keep_last),
            "--output", out, "--experiment", name, "--seed", str(cfg.seed),
            "--log-interval", str(cfg.run.log_every_steps)]
    argv += (["--aa", f"rand-m{_num(a.randaugment_magnitude)}-n{a.randaugment_ops}"]
             if a.randaugment_ops else ["--color-jitter", "0"])
    if cfg.model.channels_last:
        argv.append("--channels-last")
    if cfg.model.drop_path_rate:
        argv += ["--drop-path", _num(cfg.model.drop_path_rate)]
    if t.precision != "fp32":
        argv += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[t.precision]]
    if t.clip_grad_norm is not None:
        argv += ["--clip-grad", _num(t.clip_grad_norm), "--clip-mode", "norm"]
    if cfg.ema.enabled:
        argv += ["--model-ema", "--model-ema-decay", _num(cfg.ema.decay)]
    return argv


def cspx_validate_argv(p: Peer, weights: str, val: str) -> List[str]:
    argv = [sys.executable, os.path.join(ROOT, "validate.py"), "--checkpoint", weights,
            "--data-dir", val, "--model", p.model, "--batch-size", str(p.batch),
            "--workers", str(p.workers), "--device", p.device, "--precision", p.precision,
            "--loader", "torch", "--img-size", str(p.img_size)]
    return argv + (["--channels-last"] if p.channels_last else [])


def timm_validate_argv(p: Peer, src: str, weights: str, val: str, classes: int) -> List[str]:
    """timm's validate.py on the same folder, weights and settings; crop and interpolation come
    from timm's pretrained config of the model, which cspx's evaluation preset copies."""
    argv = [sys.executable, os.path.join(src, "validate.py"), val, "--model", p.model,
            "--num-classes", str(classes), "--checkpoint", weights, "-b", str(p.batch),
            "-j", str(p.workers), "--device", p.device, "--no-prefetcher",
            "--img-size", str(p.img_size), "--log-freq", "1000"]
    if p.precision != "fp32":
        argv += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[p.precision]]
    return argv + (["--channels-last"] if p.channels_last else [])


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
                _fill(row_of[(s, "step")], *(_difference(runs[(s, long, t)], runs[(s, short, t)])
                                             for t in ("cspx", "timm")), per=long - short)
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
