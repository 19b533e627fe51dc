"""Benchmarks (scripts/benchmark.py): timing and reporting shared by the modes, and the JPEGs
they measure on."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, TypeVar

import numpy as np
from PIL import Image

from cspx.files import atomic_write, claim_folder

JPEG_MARKER = ".cspx-bench-jpegs"

if TYPE_CHECKING:
    import torch  # imported where used: `check data` makes JPEGs without loading torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_ENV = "CSPX_SAMPLE_DIR"   # where the ImageNet sample is; tests and gpu_check.sh read it too
SAMPLE_IMAGES = 105              # the sample: one image in each of 105 classes, and synsets.txt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of fn() including the device work it queued."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


K = TypeVar("K")  # a contender's name
R = TypeVar("R")  # what one run returns: seconds, or a dict of figures


def alternate(named: Dict[K, Callable[[], R]], rounds: int,
              after_round: Optional[Callable[[Dict[K, List[R]]], None]] = None
              ) -> Dict[K, List[R]]:
    """Run the contenders in turn, `rounds` times (A B A B ...): slow drifts of a shared machine
    hit all of them alike, so their ratio is meaningful even when absolute figures wobble.
    `after_round(results so far)` runs after every round (benchmarks rewrite their JSON there)."""
    out: Dict[K, List[R]] = {k: [] for k in named}
    for _ in range(rounds):
        for k, fn in named.items():
            out[k].append(fn())
        if after_round is not None:
            after_round(out)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ----- memory -------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """Peak memory in MiB: on a GPU torch.cuda.max_memory_allocated since the last reset_peak
    (tensors only; cuDNN workspaces and DALI's buffers are not torch's); on the CPU the process's
    peak resident set so far (ru_maxrss, KiB on Linux), which never resets: per row it is a
    running maximum, not the row's own peak."""
    if device.type == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_kind(device: torch.device) -> str:
    return ("torch.cuda.max_memory_allocated during the row" if device.type == "cuda" else
            "n/a per row on CPU: the process's peak RSS so far (running maximum over rows)")


# ----- output -------------------------------------------------------------------------------------
def table(rows: List[Dict], title: str) -> str:
    if not rows:
        return f"{title}: no results"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(xs: List[str]) -> str:
        return "  ".join(x.rjust(w) for x, w in zip(xs, widths))

    rule = line(["-" * w for w in widths])
    return "\n".join([title, line(cols), rule] + [line(r) for r in cells])


def write_json(path: str, payload: Dict) -> None:
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n", durable=False)


class Report:
    """A benchmark's --json file, rewritten atomically whenever a row is added or updated, with
    "complete": false until the mode returns: a run stopped at a time limit keeps every row it
    had measured (a row updated after each round holds the medians of the rounds so far)."""

    def __init__(self, path: Optional[str], header: Dict[str, Any]):
        self.path, self.header = path, header
        self.rows: List[Dict] = []
        self.extra: Dict[str, Any] = {}
        self.flush()

    def row(self, r: Dict) -> Dict:
        """Add a row (a dict the mode may keep updating, then `flush`)."""
        self.rows.append(r)
        self.flush()
        return r

    def flush(self, complete: bool = False) -> None:
        if self.path:
            write_json(self.path, {**self.header, "complete": complete, "rows": self.rows,
                                   **self.extra})

    def finish(self, rows: List[Dict], extra: Dict[str, Any]) -> None:
        """The mode's final rows (those it did not add itself are appended) and summary."""
        self.rows += [r for r in rows if not any(r is x for x in self.rows)]
        self.extra = extra
        self.flush(complete=True)


# ----- data ---------------------------------------------------------------------------------------
def sample_root() -> str:
    """The ImageNet sample folder: $CSPX_SAMPLE_DIR, else ../shared/imagenet-sample beside the
    repository."""
    return os.environ.get(SAMPLE_ENV) or os.path.normpath(
        os.path.join(REPO, "..", "shared", "imagenet-sample"))


def _make_one(args) -> None:
    path, seed, quality = args
    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
    low = rng.integers(0, 256, size=(h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, size=(h, w, 3))
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def make_jpegs(root: str, n: int, classes: int = 10, seed: int = 0, quality: int = 90) -> str:
    """n JPEGs of ImageNet-like size (about 500x375, `quality`) in root/<wnid>/ folders, made
    in parallel and kept for the next run.

    Smooth random colour fields plus noise: they compress like photographs (about 80 KB each at
    quality 90, 118 KB at 95), so decoding costs what it costs on ImageNet. `root` must be new,
    empty or an earlier make_jpegs folder (its marker): files are only ever added to it."""
    from concurrent.futures import ProcessPoolExecutor
    claim_folder(root, JPEG_MARKER, "generated benchmark JPEG folder", "--make-data",
                 "Choose another folder.")
    jobs = []
    for i in range(n):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"img_{i:06d}.JPEG"), seed * 1_000_003 + i, quality))
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, max(1, n // 8))) as pool:
        list(pool.map(_make_one, jobs, chunksize=8))
    return root


def make_sample(root: str) -> str:
    """A stand-in for the ImageNet sample where it is missing (a checkout copied alone to a GPU
    machine): the same layout, val/<wnid>/ with one generated ImageNet-sized JPEG in each of 105
    classes, and synsets.txt listing the classes."""
    val = os.path.join(root, "val")
    make_jpegs(val, SAMPLE_IMAGES, classes=SAMPLE_IMAGES, seed=7)
    wnids = sorted(os.listdir(val))
    atomic_write(os.path.join(root, "synsets.txt"), "".join(w + "\n" for w in wnids))
    return root
