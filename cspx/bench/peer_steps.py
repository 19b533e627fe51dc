"""The `peer` benchmark's per-step breakdown (--breakdown): one training step of cspx and one of
timm's train.py, part by part, each part timed with the tool's own code.

Run as a process of its own per tool (`python -m cspx.bench.peer_steps TOOL SPEC`, started by
`breakdown`): the host allocator's state belongs to the process, and cspx's setup changes
it (cspx.hostmem), timm's does not. timm's side imports timm from the checkout (PYTHONPATH).
Everything runs on one thread (torch.set_num_threads(1), as a DataLoader worker does), and each
part is measured as this thread's CPU time (user + system) and minor page faults
(getrusage(RUSAGE_THREAD)): figures a busy machine disturbs far less than wall time, and whose
sum is the CPU work of a step. The data parts are summed over the batch's images (in the real
runs they happen in the DataLoader workers, in parallel with the model's step); handing the
batch from a worker to the main process (shared memory) is not included. Prints one JSON line:
{part: [ms, faults], ...}, medians over `steps` steps after one warm-up step.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List


class Parts:
    """Accumulates each part's CPU ms and page faults over one step."""

    def __init__(self):
        self.step: Dict[str, List[float]] = {}
        self.steps: List[Dict[str, List[float]]] = []

    def __call__(self, part: str, fn: Callable, *args):
        r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
        out = fn(*args)
        t1, r1 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
        acc = self.step.setdefault(part, [0.0, 0.0])
        acc[0] += 1e3 * (t1 - t0)
        acc[1] += r1.ru_minflt - r0.ru_minflt
        return out

    def end_step(self) -> None:
        self.steps.append(self.step)
        self.step = {}

    def medians(self) -> Dict[str, List[float]]:
        steps = self.steps[1:]  # the first is the warm-up
        return {k: [statistics.median(s[k][i] for s in steps) for i in (0, 1)] for k in steps[0]}


def cspx_steps(recipe: str, overrides: List[str], steps: int) -> Dict[str, List[float]]:
    import torch

    from cspx import precision
    from cspx.config import load_config
    from cspx.data.index import build_index
    from cspx.data.torch_loader import DeviceFeeder, TrainDataset, collate
    from cspx.data.transforms import decode_rgb, sample_seed, seeded
    from cspx.models import create_model
    from cspx.optim import build_optimizer, set_lr
    from cspx.schedule import lr_for
    from cspx.train_loop import training_loss
    cfg = load_config(recipe, overrides, check_paths=False)
    device = torch.device("cpu")
    precision.configure_backends(device)  # what train.py's setup does
    torch.set_num_threads(1)
    index = build_index(f"{cfg.data.root}/train", None, warn=False)
    dataset = TrainDataset(split=index, aug=cfg.aug, seed=cfg.seed)
    model = create_model(cfg.model.name, num_classes=index.num_classes).train()
    opt = build_optimizer(model, cfg.optim, device)
    feeder = DeviceFeeder(device=device, channels_last=cfg.model.channels_last)
    loss_sum = torch.zeros(())
    part = Parts()
    b = cfg.train.batch_size
    for step in range(steps + 1):
        samples = []
        for i in range(step * b, (step + 1) * b):
            j = i % len(index)
            img = part("decode", lambda j=j: decode_rgb(index.read(j)))
            ctx = part("seeding", lambda j=j: seeded(sample_seed(cfg.seed, 0, j)))
            part("seeding", ctx.__enter__)
            for name, stage in dataset.transform.steps:  # TrainTransform's own stages
                img = part(name, stage, img)
            part("seeding", ctx.__exit__, None, None, None)
            samples.append((img, int(index.labels[j]), 0))
        x, y, _ = part("collate", collate, samples)
        x, y = part("normalize", feeder, x, y)
        part("bookkeeping", lambda step=step: set_lr(opt, lr_for(cfg, step)))
        out = part("forward", model, x)
        loss = part("loss", training_loss, out, y, cfg.train.label_smoothing)
        part("backward", loss.backward)
        part("optimizer", opt.step)
        part("zero_grad", opt.zero_grad, True)
        part("bookkeeping", loss_sum.add_, loss.detach())
        part.end_step()
    return part.medians()


def timm_steps(data: str, model_name: str, batch: int, img_size: int, scale: List[float],
               ratio: List[float], hflip: float, interpolation: str, aa: str, opt: str,
               lr: float, momentum: float, wd: float, power: float, smoothing: float,
               steps: int) -> Dict[str, List[float]]:
    import timm
    import torch
    from PIL import Image
    from timm.data import create_dataset, create_transform
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import AverageMeter
    from torch.utils.data import default_collate
    torch.set_num_threads(1)
    dataset = create_dataset("", root=data, split="train", is_training=True)
    # train.py's create_loader -> create_transform, with the flags the peer mode passes
    (s_lo, s_hi), (r_lo, r_hi) = scale, ratio  # two values each (AugConfig)
    tf = create_transform(img_size, is_training=True, scale=(s_lo, s_hi), ratio=(r_lo, r_hi),
                          hflip=hflip, color_jitter=0.0, auto_augment=aa or None,
                          interpolation=interpolation, mean=timm.data.IMAGENET_DEFAULT_MEAN,
                          std=timm.data.IMAGENET_DEFAULT_STD, use_prefetcher=False)
    classes = len({t for _, t in dataset.reader.samples})
    model = timm.create_model(model_name, num_classes=classes).train()
    loss_fn = LabelSmoothingCrossEntropy(smoothing)
    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=wd, momentum=momentum)
    sched, _ = create_scheduler_v2(optimizer, sched="poly", num_epochs=steps + 1,
                                   decay_rate=power, warmup_epochs=0, step_on_epochs=False,
                                   updates_per_epoch=1)
    losses = AverageMeter()
    names = {"RandomResizedCropAndInterpolation": "crop", "RandomHorizontalFlip": "flip",
             "RandAugment": "RandAugment", "ColorJitter": "colour jitter (none)",
             "MaybeToTensor": "to tensor", "Normalize": "normalize"}
    part = Parts()
    for step in range(steps + 1):
        samples = []
        for i in range(step * batch, (step + 1) * batch):
            j = i % len(dataset)
            path, target = dataset.reader.samples[j]
            img = part("decode", lambda path=path: Image.open(path).convert("RGB"))
            for t in tf.transforms:
                img = part(names.get(type(t).__name__, type(t).__name__), t, img)
            samples.append((img, target))
        x, y = part("collate", default_collate, samples)
        out = part("forward", model, x)
        loss = part("loss", loss_fn, out, y)
        part("backward", loss.backward)
        part("optimizer", optimizer.step)
        part("zero_grad", optimizer.zero_grad)
        part("bookkeeping", lambda loss=loss, step=step: (
            losses.update(loss.item(), batch), sched.step_update(num_updates=step + 1)))
        part.end_step()
    return part.medians()


MAIN = ("forward", "loss", "backward", "optimizer", "zero_grad", "bookkeeping")


def timm_spec(argv: List[str], data: str, steps: int) -> Dict:
    """timm_steps' arguments from the timm train.py command the peer mode runs."""
    f: Dict[str, List[str]] = {}
    key = None
    for a in argv[2:]:
        if a.startswith("--") or a in ("-b", "-vb"):
            key = a
            f[key] = []
        elif key is not None:
            f[key].append(a)

    def one(k: str) -> float:  # a flag's single number
        return float(f[k][0])

    return dict(data=data, model_name=f["--model"][0], batch=int(f["-b"][0]),
                img_size=int(f["--img-size"][0]), scale=[float(x) for x in f["--scale"]],
                ratio=[float(x) for x in f["--ratio"]], hflip=one("--hflip"),
                interpolation=f["--train-interpolation"][0], aa=f.get("--aa", [""])[0],
                opt=f["--opt"][0], lr=one("--lr"), momentum=one("--momentum"),
                wd=one("--weight-decay"), power=one("--decay-rate"), smoothing=one("--smoothing"),
                steps=steps)


def breakdown(setting: str, cspx_spec: Dict, timm_argv: List[str], data: str, steps: int,
              envs: Dict[str, Dict[str, str]]) -> List[Dict]:
    """Rows of the breakdown table for one setting: each part's median ms and page faults per
    step, cspx beside timm, then the totals of the workers' and the main process's parts."""
    import os
    import subprocess

    from cspx.errors import CspxError, last_line
    got = {}
    for tool, spec in (("cspx", {**cspx_spec, "steps": steps}),
                       ("timm", timm_spec(timm_argv, data, steps))):
        env = dict(envs[tool])  # timm's side: the checkout's timm first, this module after it
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([env["PYTHONPATH"], envs["cspx"][
            "PYTHONPATH"]]))
        r = subprocess.run([sys.executable, "-m", "cspx.bench.peer_steps", tool, json.dumps(spec)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise CspxError(f"peer breakdown: {tool}'s step failed: {last_line(r.stderr)}")
        got[tool] = json.loads(r.stdout.strip().splitlines()[-1])
    where = {"cspx": lambda p: "main" if p in MAIN or p == "normalize" else "workers",
             "timm": lambda p: "main" if p in MAIN else "workers"}
    parts = list(dict.fromkeys([*got["cspx"], *got["timm"]]))
    parts.sort(key=lambda p: p in MAIN)  # the data parts first, as a step sees them
    rows: List[Dict] = []
    totals: Dict[str, Dict[str, List[float]]] = {}  # place -> tool -> [ms, faults]
    for part in parts:
        row = {"setting": setting, "part": part}
        for tool in ("cspx", "timm"):
            ms, faults = got[tool].get(part, [0.0, 0.0])
            row[f"{tool} ms"], row[f"{tool} faults"] = ms, faults
            if part in got[tool]:
                row[f"{tool} in"] = where[tool](part)
                total = totals.setdefault(where[tool](part), {"cspx": [0.0, 0.0],
                                                             "timm": [0.0, 0.0]})[tool]
                total[0] += ms
                total[1] += faults
        rows.append(row)
    for place in ("workers", "main"):
        t = totals.get(place, {"cspx": [0.0, 0.0], "timm": [0.0, 0.0]})
        rows.append({"setting": setting, "part": f"total, {place}",
                     "cspx ms": t["cspx"][0], "cspx faults": t["cspx"][1],
                     "timm ms": t["timm"][0], "timm faults": t["timm"][1]})
    return rows


if __name__ == "__main__":
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    fn = cspx_steps if kind == "cspx" else timm_steps
    print(json.dumps(fn(**spec)))
