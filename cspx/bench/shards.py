"""The `shards` benchmark: a sharded dataset against the same JPEGs as loose files, at start-up,
in loader throughput, and when copied to another folder.

  python scripts/benchmark.py shards --make-data 50000 --workers 8 --batch 128 --rounds 3

Data. --make-data N (default 50,000) generated JPEGs of ImageNet's size and weight (500x375 or
375x500, quality 94: about 110 KB each, ImageNet's average) at two sizes, N and N / 5, each as an
ImageNet-layout folder (train/ in up to 1,000 class folders, val/ one image per class) and as
shards of it (scripts/make_shards.py, 256 MB shards). The images are made once, in
cspx.data.index.cache_dir()/bench-shards/pool, and the folders are hard links to them.

Each measurement runs a fresh Python process (this module, `_child`) doing what a training run
does before its first step: build_splits, resolve, build_train_loader, then batches. Reported:
- startup: seconds from launching the process to its first training batch, the part of it
  from build_splits on (the data stage: Python and torch imports excluded), and within that the
  index alone (build_splits: listing the files, or reading the manifest and the shard check),
  which is what every rank waits for before its first collective. Folders with a cold
  cspx index cache (a new CSPX_CACHE: listing and quick scan of every file) and a warm one (the
  cache the cold run left). The OS page cache is not dropped (that needs root).
- throughput: images/s of the loader over --steps batches after a warm-up filling its queues.
- copy: `cp -r` of each whole dataset (size N) into a scratch folder this benchmark creates, and
  deletes afterwards, beside --out-dir (default: the system temp folder).
Contenders alternate (A B A B ...) for --rounds rounds; medians are reported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from functools import partial
from typing import Callable, Dict, List, Tuple

from cspx.bench.common import alternate, make_jpegs, median
from cspx.data.index import cache_dir
from cspx.errors import CspxError, last_line

QUALITY = 94          # JPEG quality giving ImageNet's ~110 KB per 500x375 image (common.py)
DEFAULT_IMAGES = 50_000
SMALL_FRACTION = 5    # the second size is N / 5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _classes(n: int) -> int:
    """Class folders: ImageNet's 1,000 at 50,000 images and above, 50 images each below."""
    return max(1, min(1000, n // 50))


def _folder(base: str, pool: str, n: int) -> str:
    """base/folder-n: train/<wnid>/ holding pool images 0..n-1 (image i in class i mod c), and
    val/<wnid>/ holding images 0..c-1, one per class; hard links, made once."""
    root = os.path.join(base, f"folder-{n}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    c = _classes(n)
    for split, count in (("train", n), ("val", c)):
        for i in range(count):
            d = os.path.join(root, split, f"n{i % c:08d}")
            os.makedirs(d, exist_ok=True)
            dst = os.path.join(d, f"img_{i:06d}.JPEG")
            if not os.path.exists(dst):
                os.link(os.path.join(pool, "n00000000", f"img_{i:06d}.JPEG"), dst)
    open(done, "w").close()
    return root


def _shards(base: str, folder: str, n: int, workers: int) -> str:
    """base/shards-n: scripts/make_shards.py of the folder (resumable; skipped once complete)."""
    out = os.path.join(base, f"shards-{n}")
    if not os.path.exists(os.path.join(out, "shards.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_shards.py"), folder,
                        out, "--workers", str(max(1, workers))], check=True)
    return out


def datasets(n: int, workers: int) -> Dict[int, Tuple[str, str]]:
    """{size: (folder, shards)} for sizes n / 5 and n."""
    base = os.path.join(cache_dir(), "bench-shards")
    pool = os.path.join(base, "pool")
    t = time.time()
    make_jpegs(pool, n, classes=1, quality=QUALITY)
    print(f"data: {n} JPEGs in {pool} ({time.time() - t:.0f} s)", file=sys.stderr)
    out = {}
    for size in sorted({max(1, n // SMALL_FRACTION), n}):
        folder = _folder(base, pool, size)
        out[size] = (folder, _shards(base, folder, size, workers))
    return out


def _overrides(args: Namespace, root: str, fmt: str, kind: str) -> List[str]:
    return [f"data.root={root}", f"data.format={fmt}", f"data.loader={kind}",
            f"data.workers={args.workers}", "data.synthetic=false", "data.classes=null",
            "data.exclude=null", f"train.batch_size={args.batch}", "train.accum_steps=1",
            f"aug.img_size={args.img_size}", f"model.name={args.model}", "sched.burn_in=0",
            f"run.device={args.device}", f"train.precision={args.precision}", *args.set]


def _launch(args: Namespace, overrides: List[str], cache: str) -> Dict[str, float]:
    """One fresh process: its startup (launch to first batch, s), its data stage (build_splits
    to first batch, s), its index (build_splits alone, s) and its img/s."""
    spec = {"recipe": args.recipe, "overrides": overrides, "steps": args.steps,
            "warmup": 4 * max(1, args.workers) + 2}  # DataLoader: 4 batches queued per worker
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "cspx.bench.shards", json.dumps(spec)], cwd=ROOT,
                       env=dict(os.environ, CSPX_CACHE=cache, PYTHONPATH=ROOT),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CspxError(f"shards benchmark: a measuring process failed: {last_line(r.stderr)}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"startup": out["first_batch"] - t0, "data": out["first_batch"] - out["data_start"],
            "index": out["index_done"] - out["data_start"], "img/s": out["img/s"]}


def _copy_seconds(src: str, scratch_parent: str) -> float:
    scratch = tempfile.mkdtemp(prefix="cspx-bench-copy-", dir=scratch_parent)
    try:  # only this folder, made here, is ever deleted
        t = time.perf_counter()
        subprocess.run(["cp", "-r", src, os.path.join(scratch, "data")], check=True)
        return time.perf_counter() - t
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _launch_cold(args: Namespace, overrides: List[str], caches: str) -> Dict[str, float]:
    """_launch with a new, empty index cache under `caches`."""
    return _launch(args, overrides, tempfile.mkdtemp(dir=caches))


def bench(args: Namespace) -> Tuple[List[Dict], Dict]:
    n = args.make_data or DEFAULT_IMAGES
    data = datasets(n, args.workers)
    rows: List[Dict] = []
    raw: Dict[str, Dict[str, List[Dict[str, float]]]] = {}  # per size and loader: _launch's
    caches = tempfile.mkdtemp(prefix="cspx-bench-cache-")
    try:
        for size, (folder, shards) in data.items():
            for kind in args.loaders:
                warm = os.path.join(caches, f"warm-{size}-{kind}")
                on_folder = _overrides(args, folder, "folder", kind)
                on_shards = _overrides(args, shards, "shards", kind)
                runs: Dict[str, Callable[[], Dict[str, float]]] = {
                    "folder, cold index": partial(_launch_cold, args, on_folder, caches),
                    "folder, warm index": partial(_launch, args, on_folder, warm),
                    "shards": partial(_launch_cold, args, on_shards, caches),
                }
                _launch(args, on_folder, warm)  # fills `warm`
                res = alternate(runs, args.rounds)
                raw[f"{size} {kind}"] = res
                rows += _rows(size, kind, res)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    big_folder, big_shards = data[n]
    copies = alternate({"folder": lambda: _copy_seconds(big_folder, args.out_dir),
                        "shards": lambda: _copy_seconds(big_shards, args.out_dir)}, args.rounds)
    f, s = median(copies["folder"]), median(copies["shards"])
    rows.append({"measure": "copy (cp -r), s", "images": n, "loader": "-", "folder": f,
                 "shards": s, "shards gain x": f / s})
    jpeg_bytes = [os.path.getsize(os.path.join(d, x))
                  for d, _, xs in os.walk(os.path.join(big_folder, "train")) for x in xs]
    return rows, {"images": n, "sizes": sorted(data), "jpeg_kb_mean": sum(jpeg_bytes) / 1e3 / n,
                  "raw": {**raw, "copy": copies}}


def _rows(size: int, kind: str, res: Dict[str, List[Dict[str, float]]]) -> List[Dict]:
    """Medians: startup and data stage (cold and warm index against shards) and throughput,
    shards vs folder."""
    m = {k: {q: median([r[q] for r in v]) for q in ("startup", "data", "index", "img/s")}
         for k, v in res.items()}
    s = m["shards"]
    out = [{"measure": f"{what}, {which} index, s", "images": size, "loader": kind,
            "folder": m[f"folder, {which} index"][q], "shards": s[q],
            "shards gain x": m[f"folder, {which} index"][q] / s[q]}
           for q, what in (("startup", "startup"), ("data", "data stage"), ("index", "index"))
           for which in ("cold", "warm")]
    folder_ips = median([r["img/s"] for k, v in res.items() if k != "shards" for r in v])
    out.append({"measure": "loader img/s", "images": size, "loader": kind, "folder": folder_ips,
                "shards": s["img/s"], "shards gain x": s["img/s"] / folder_ips})
    return out


def _child(spec: dict) -> None:
    """A training run's data stage, timed (see the module doc); prints one JSON line."""
    import torch

    from cspx.config import load_config
    from cspx.data.build import build_splits, build_train_loader
    from cspx.distributed import DistEnv
    from cspx.resolve import resolve
    cfg = load_config(spec["recipe"], spec["overrides"], check_paths=False)
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and
                                             torch.cuda.is_available())
    env = DistEnv(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    data_start = time.time()
    data = build_splits(cfg, env)
    index_done = time.time()
    cfg = resolve(cfg, env, data)
    with tempfile.TemporaryDirectory() as work:
        loader = build_train_loader(cfg, data[0], env, work)
        next(loader)
        sync()
        first = time.time()
        for _ in range(spec["warmup"]):
            next(loader)
        sync()
        t = time.perf_counter()
        for _ in range(spec["steps"]):
            next(loader)
        sync()
        ips = spec["steps"] * cfg.train.batch_size / (time.perf_counter() - t)
        loader.close()
    print(json.dumps({"data_start": data_start, "index_done": index_done, "first_batch": first,
                      "img/s": ips}), flush=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
