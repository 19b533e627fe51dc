"""Benchmarks (scripts/benchmark.py): timing and reporting shared by the modes."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of fn() including the device work it queued."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def alternate(named: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    """Run the contenders in turn, `rounds` times (A B A B ...): slow drifts of a shared machine
    hit all of them alike, so their ratio is meaningful even when absolute figures wobble."""
    out: Dict[str, List[float]] = {k: [] for k in named}
    for _ in range(rounds):
        for k, fn in named.items():
            out[k].append(fn())
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(rows: List[Dict], title: str) -> str:
    if not rows:
        return f"{title}: no results"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:,.3f}" if isinstance(v, float) and abs(v) < 100 else (
        f"{v:,.1f}" if isinstance(v, float) else str(v))
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))
    return "\n".join([title, line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path: str, payload: Dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def _make_one(args) -> None:
    path, seed, quality = args
    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
    low = rng.integers(0, 256, size=(h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, size=(h, w, 3))
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def make_jpegs(root: str, n: int, classes: int = 10, seed: int = 0, quality: int = 90) -> str:
    """n JPEGs of ImageNet-like size (about 500x375, `quality`) in root/<wnid>/ folders, made
    in parallel and kept for the next run.

    Smooth random colour fields plus noise: they compress like photographs (about 80 KB each at
    quality 90, 118 KB at 95), so decoding costs what it costs on ImageNet."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = []
    for i in range(n):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"img_{i:06d}.JPEG"), seed * 1_000_003 + i, quality))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_make_one, jobs, chunksize=32))
    return root
