#!/usr/bin/env python3
"""Write ImageNet as tar shards that cspx, DALI (fn.readers.webdataset) and webdataset can read.

  make_shards.py SRC OUT        SRC in ImageNet layout: SRC/train/<wnid>/, SRC/val/<wnid>/
  make_shards.py OUT --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar --devkit DIR
  make_shards.py OUT --verify   check every shard of OUT in full against its manifest

Sources are read, never changed. The official tars are not unpacked: their members are indexed
and read by offset (the train tar must be uncompressed, as downloaded). --train/--val also take
folders and the val labels come from --devkit (with meta.mat, or --synset-map) or --val-csv,
exactly as scripts/prepare_imagenet.py takes them. Labels: line k of --classes FILE, else of
SRC/synsets.txt, else the k-th sorted class.

OUT/<split>/<split>-NNNNNN.tar hold about --shard-size MB (10^6 bytes) each; the format is
described in cspx/data/shard_format.py. Training samples are written in a random order drawn from
--seed, so every shard mixes all classes; val is sorted by path. Every image is decoded first
(--workers processes); files that fail are left out and listed in OUT/<split>/excluded.txt.

Interrupted? Run the same command again: shards finished and intact are kept, the rest are
written again, identically. At the end every shard is checked in full (sha256, members, labels)
and the manifest OUT/shards.json is written last. OUT must be new, empty, or made by this tool.
exit status: 0 done and verified; 2 bad input or a failed check (one line on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

import cspx
from cspx.data import imagenet_sources as src_lib
from cspx.data import scan
from cspx.data.index import read_classes_file
from cspx.data.shard_format import (
    EXCLUDED,
    MANIFEST,
    MARKER,
    SAMPLE_DTYPE,
    SYNSETS,
    TABLE,
    Manifest,
    ShardInfo,
    SplitInfo,
    check_shard,
    read_manifest,
    shard_name,
)
from cspx.data.shard_reader import load_table
from cspx.data.shard_writer import ShardWriter, member_bytes, verify_shard
from cspx.errors import CspxError, run_cli
from cspx.files import atomic_write, claim_folder, remove_stale_temps, write_json

STATE = ".make_shards"   # per-shard records: what makes a rerun keep a finished shard
MB = 1_000_000
CHUNK = 16               # images per task sent to a worker process
Item = Tuple[str, int, src_lib.Location]  # (path relative to the split, label, where the bytes are)


# ----------------------------------------------------------------------------- sources
def _class_folders(folder: str) -> List[str]:
    """The index's rule (cspx/data/index.py): every subfolder not starting with '.' is a class."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def gather(a) -> Tuple[Dict[str, List[Tuple[str, str, src_lib.Location]]], Dict[str, str],
                       Dict[str, str]]:
    """({split: [(rel path, wnid, location)]}, {wnid: name}, {split: source}); nothing written."""
    found: Dict[str, List[Tuple[str, str, src_lib.Location]]] = {}
    names: Dict[str, str] = {}
    where: Dict[str, str] = {}
    if a.src:
        for split in ("train", "val"):
            d = os.path.join(a.src, split)
            if os.path.isdir(d) and _class_folders(d):
                found[split] = [(f"{w}/{n}", w, (os.path.join(d, w, n), 0, -1))
                                for w in _class_folders(d)
                                for n in src_lib.list_images(os.path.join(d, w))]
                where[split] = d
        if not found:
            raise CspxError(f"{a.src}: expected train/<wnid>/ or val/<wnid>/ folders in it")
        syn = os.path.join(a.src, SYNSETS)
        if os.path.isfile(syn):
            names = src_lib.name_lines(syn)
        return found, names, where
    if a.train:
        found["train"] = [(f"{w}/{n}", w, loc) for job in src_lib.train_jobs(a.train)
                          for w in [job[0]] for n, loc in src_lib.train_images(job)]
        where["train"] = a.train
    if a.val:
        labels, names = (src_lib.devkit_labels(a.devkit, a.synset_map) if a.devkit
                         else src_lib.csv_labels(a.val_csv))
        items, tar = src_lib.val_sources(a.val)
        if tar is not None:
            src_lib.plain_tar(tar, "the val tar").close()  # offsets need an uncompressed tar
        known = {w for _, w, _ in found.get("train", [])}
        wnid = src_lib.val_wnids(items, labels, known, a.devkit or a.val_csv)
        found["val"] = sorted((f"{wnid[n]}/{n}", wnid[n], src_lib.location(it, tar))
                              for n, it in items)
        where["val"] = a.val
    if a.synset_map and not (a.val and a.devkit):
        names.update(src_lib.read_synset_map(a.synset_map)[1])
    return found, names, where


def class_list(a, found, names: Dict[str, str]) -> List[str]:
    path = a.classes or (os.path.join(a.src, SYNSETS) if a.src and os.path.isfile(
        os.path.join(a.src, SYNSETS)) else None)
    if path is None:
        return sorted({w for items in found.values() for _, w, _ in items})
    classes = read_classes_file(path)
    if a.classes:
        names.update(src_lib.name_lines(path))
    known = set(classes)
    for split, items in found.items():
        unknown = sorted({w for _, w, _ in items if w not in known})
        if unknown:
            raise CspxError(f"{path}: {split} class {unknown[0]!r} is not in the class list"
                            + (f" ({len(unknown)} such classes)" if len(unknown) > 1 else ""))
    return classes


def plan(found, classes: List[str], seed: int) -> Dict[str, List[Item]]:
    """Each split in writing order: train in a seeded random order, val sorted by path."""
    label = {w: k for k, w in enumerate(classes)}
    out = {}
    for split, items in found.items():
        items = sorted(items)
        if split == "train":
            items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
        out[split] = [(rel, label[w], loc) for rel, w, loc in items]
    return out


def plan_hash(split: str, items: List[Item], classes: List[str], seed: int, limit: int) -> str:
    """What a finished shard depends on; where the sources live is not part of it."""
    h = hashlib.sha256(json.dumps([split, classes, seed, limit]).encode())
    for rel, lab, _ in items:
        h.update(f"{rel}\t{lab}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- checking
_FDS: Dict[str, int] = {}  # per process: open source tars, read by offset


def _load(loc: src_lib.Location) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes, None) for an image that decodes, else (None, reason)."""
    path, offset, size = loc
    try:
        if size < 0:
            with open(path, "rb") as f:
                data = f.read()
        else:
            fd = _FDS.get(path)
            if fd is None:
                fd = _FDS[path] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, size, offset)
            if len(data) != size:
                return None, f"unreadable (source tar ends inside it: {len(data)} of {size} bytes)"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    reason = scan.check_bytes(data)
    return (None, reason) if reason else (data, None)


def _load_many(locs: List[src_lib.Location]):
    return [_load(loc) for loc in locs]


def _worker_init() -> None:
    """Linux: a worker ends with the writer. Killed with SIGKILL, the writer cannot stop its
    pool, and the workers would go on decoding for nobody (prctl PR_SET_PDEATHSIG = 1)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # not glibc Linux: orphans exit when their queue breaks
        pass


def checked(locs: List[src_lib.Location], workers: int) -> Iterator[Tuple[Optional[bytes],
                                                                          Optional[str]]]:
    """_load of each location, in order; at most 4 tasks per worker in flight, so memory stays
    bounded (about 4 x 16 images per worker) however slow the writer is."""
    if workers <= 1:
        yield from map(_load, locs)
        return
    starts = iter(range(0, len(locs), CHUNK))
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        pending: deque = deque()

        def submit() -> None:
            s = next(starts, None)
            if s is not None:
                pending.append(pool.submit(_load_many, locs[s:s + CHUNK]))

        for _ in range(4 * workers):
            submit()
        while pending:
            fut = pending.popleft()
            submit()
            yield from fut.result()


# ----------------------------------------------------------------------------- writing
def _table_bytes(rows: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


class SplitJob:
    """Writes one split's shards, keeping those a previous run finished (records in STATE)."""

    def __init__(self, out: str, split: str, items: List[Item], phash: str, limit: int,
                 workers: int):
        self.out, self.split, self.items, self.phash = out, split, items, phash
        self.limit, self.workers = limit, workers
        self.dir, self.state = os.path.join(out, split), os.path.join(out, STATE)
        self.written = 0  # shards written by this run

    def _record_path(self, k: int, ext: str) -> str:
        return os.path.join(self.state, f"{shard_name(self.split, k)}.{ext}")

    def records(self) -> List[dict]:
        """The consecutive records of a previous run, from shard 0. A previous run of another
        plan is refused: its shards would be overwritten, and a reader of the old manifest
        would find them changed under it."""
        out: List[dict] = []
        while True:
            try:
                with open(self._record_path(len(out), "json"), "r", encoding="utf-8") as f:
                    r = json.load(f)
            except (OSError, ValueError):
                return out
            if r.get("plan") != self.phash:
                if not out:
                    raise CspxError(f"OUT: {self.out} holds {self.split} shards made from other "
                                    f"images, classes, --seed or --shard-size; rerun with the "
                                    f"same sources and options, or choose a new folder")
                return out
            out.append(r)

    def _finish(self, w: ShardWriter, start: int, end: int, bad: Dict[str, str]) -> dict:
        info, rows = w.close()
        atomic_write(self._record_path(w.shard, "npy"), _table_bytes(rows))
        rec = {"plan": self.phash, "start": start, "end": end, "bad": bad, "state": "done",
               "info": dataclasses.asdict(info)}
        write_json(self._record_path(w.shard, "json"), rec)  # last: the shard now counts as done
        self.written += 1
        return rec

    def _write(self, k: int, start: int, end: int, pos: int, bar, cut: bool) -> List[dict]:
        """Shards k, k+1, ... from plan items [start, end), first position `pos`. Without `cut`
        everything goes into shard k (rewriting a recorded shard)."""
        recs: List[dict] = []
        w: Optional[ShardWriter] = None
        bad: Dict[str, str] = {}
        range_start = start
        try:
            locs = [loc for _, _, loc in self.items[start:end]]
            for i, (data, reason) in enumerate(checked(locs, self.workers), start):
                rel, label, _ = self.items[i]
                bar.update(1)
                if reason is not None:
                    bad[rel] = reason
                    continue
                assert data is not None  # _load gives the bytes or a reason
                if cut and w is not None and w.bytes + member_bytes(len(data), rel) > self.limit:
                    recs.append(self._finish(w, range_start, i, bad))
                    w, bad, range_start, k = None, {}, i, k + 1
                if w is None:
                    w = ShardWriter(self.dir, shard_name(self.split, k), k)
                w.add(pos, label, rel, data)
                pos += 1
            if w is None:  # a range always starts with a good image, unless all are bad
                raise CspxError(f"{self.split}: no image decodes: {scan.summarize(bad)}")
            recs.append(self._finish(w, range_start, end, bad))
        finally:
            if w is not None:
                w.abort()
        return recs

    def run(self) -> List[dict]:
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.state, exist_ok=True)
        remove_stale_temps(self.dir, lambda name: True)    # our own folders inside OUT
        remove_stale_temps(self.state, lambda name: True)
        remove_stale_temps(self.out, lambda name: name in (MANIFEST, SYNSETS, MARKER))
        recs = self.records()
        done = sum(r["end"] - r["start"] for r in recs)
        with tqdm(total=len(self.items), initial=done, unit="img", desc=self.split) as bar:
            for k, r in enumerate(recs):
                info = ShardInfo(**r["info"])
                if r["state"] == "done" and os.path.isfile(self._record_path(k, "npy")) \
                        and check_shard(self.dir, info) is None:
                    continue
                bar.update(-(r["end"] - r["start"]))
                again = self._write(k, r["start"], r["end"], info.first, bar, cut=False)
                if len(again) != 1 or again[0]["info"]["sha256"] != info.sha256:
                    raise CspxError(f"{self.dir}: {info.name} written again differs from its "
                                    f"first writing; the source changed. Use a new OUT")
                recs[k] = again[0]
            start = recs[-1]["end"] if recs else 0
            pos = recs[-1]["info"]["first"] + recs[-1]["info"]["samples"] if recs else 0
            if start < len(self.items):
                recs += self._write(len(recs), start, len(self.items), pos, bar, cut=True)
        return recs

    def rows(self, k: int) -> np.ndarray:
        return np.load(self._record_path(k, "npy"), allow_pickle=False)

    def mark_damaged(self, k: int, rec: dict) -> None:
        write_json(self._record_path(k, "json"), {**rec, "state": "damaged"})


def verify_all(jobs: List[Tuple[str, ShardInfo, np.ndarray]], workers: int) -> List[str]:
    """verify_shard over (split folder, shard, its table rows); returns the problems found."""
    args = list(zip(*jobs)) if jobs else [(), (), ()]
    if workers <= 1:
        results = list(map(verify_shard, *args))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
            results = list(pool.map(verify_shard, *args))
    return [r for r in results if r is not None]


def verify_existing(out: str, workers: int) -> int:
    m = read_manifest(out)
    for split, info in m.splits.items():
        table = load_table(out, split, m)
        jobs = [(os.path.join(out, split), s, table[s.first:s.first + s.samples])
                for s in info.shards]
        problems = verify_all(jobs, workers)
        if problems:
            raise CspxError(f"{out}/{split}: {len(problems)} of {len(jobs)} shards failed: "
                            + "; ".join(problems[:3]))
        print(f"{split}: {len(jobs)} shards, {info.samples} samples verified")
    return 0


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="[SRC] OUT",
                   help="ImageNet-layout source folder (unless --train/--val) and output folder")
    p.add_argument("--train", metavar="TAR|DIR", help="ILSVRC2012_img_train.tar or its classes")
    p.add_argument("--val", metavar="TAR|DIR", help="ILSVRC2012_img_val.tar or its flat images")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--devkit", metavar="DIR", help="ILSVRC2012 devkit (val labels)")
    lab.add_argument("--val-csv", metavar="FILE", help="Kaggle LOC_val_solution.csv (val labels)")
    p.add_argument("--synset-map", metavar="FILE", help="class ID -> wnid instead of meta.mat")
    p.add_argument("--classes", metavar="FILE", help="class list: line k is label k")
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB",
                   help="target shard size in MB (default: 256)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="processes decoding images for the check (default: min(8, CPUs))")
    p.add_argument("--seed", type=int, default=0, help="seed of the training order (default: 0)")
    p.add_argument("--verify", action="store_true", help="only check OUT's shards in full")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    a = p.parse_args(argv)
    if len(a.paths) > 2:
        raise CspxError(f"expected [SRC] OUT, got {len(a.paths)} paths")
    a.src = os.path.abspath(a.paths[0]) if len(a.paths) == 2 else None
    out = os.path.abspath(os.path.expanduser(a.paths[-1]))
    if a.verify:
        return verify_existing(out, a.workers)
    if bool(a.src) == bool(a.train or a.val):
        raise CspxError("give either SRC (an ImageNet-layout folder) or --train/--val, not both"
                        if a.src else "nothing to do: give SRC OUT, or OUT with --train/--val")
    if a.val and not (a.devkit or a.val_csv):
        raise CspxError("--val needs labels: --devkit DIR or --val-csv LOC_val_solution.csv")
    if not a.shard_size > 0:
        raise CspxError(f"--shard-size: {a.shard_size} is not a positive number of MB")
    for s in filter(None, (a.src, a.train, a.val)):
        s = os.path.abspath(s)
        if os.path.isdir(s) and os.path.commonpath([s, out]) == s:
            raise CspxError(f"OUT: {out} is inside the source {s}; write it elsewhere")
    try:
        found, names, where = gather(a)
        classes = class_list(a, found, names)
        plans = plan(found, classes, a.seed)
        limit = int(a.shard_size * MB)
        claim_folder(out, MARKER, "sharded dataset", "OUT", "Choose a new or empty folder.",
                     info={"tool": "scripts/make_shards.py"})
        t0 = time.time()
        jobs = {s: SplitJob(out, s, items, plan_hash(s, items, classes, a.seed, limit), limit,
                            a.workers) for s, items in plans.items()}
        recs = {s: j.run() for s, j in jobs.items()}
        checks = [(j.dir, ShardInfo(**r["info"]), j.rows(k))
                  for s, j in jobs.items() for k, r in enumerate(recs[s])]
        problems = verify_all(checks, a.workers)
        if problems:
            for s, j in jobs.items():
                for k, r in enumerate(recs[s]):
                    if any(p.startswith(r["info"]["name"]) for p in problems):
                        j.mark_damaged(k, r)
            raise CspxError(f"{out}: {len(problems)} shards failed the final check ("
                            + "; ".join(problems[:3]) + "); run the same command to rewrite them")
        splits, n_classes = {}, {}
        for s, j in jobs.items():
            rows = np.concatenate([j.rows(k) for k in range(len(recs[s]))]).astype(SAMPLE_DTYPE)
            n_classes[s] = len(np.unique(rows["label"]))
            table = _table_bytes(rows)
            atomic_write(os.path.join(j.dir, TABLE), table)
            bad = {rel: why for r in recs[s] for rel, why in r["bad"].items()}
            atomic_write(os.path.join(j.dir, EXCLUDED),
                         "".join(f"{rel}\t{bad[rel]}\n" for rel in sorted(bad)))
            shards = [ShardInfo(**r["info"]) for r in recs[s]]
            splits[s] = SplitInfo(sum(x.samples for x in shards), sum(x.bytes for x in shards),
                                  "shuffled" if s == "train" else "sorted",
                                  a.seed if s == "train" else None, len(table),
                                  hashlib.sha256(table).hexdigest(), bad, shards)
        atomic_write(os.path.join(out, SYNSETS),
                     "".join(f"{w} {names[w]}\n" if names.get(w) else f"{w}\n" for w in classes))
        manifest = Manifest(classes, splits, a.shard_size, where, cspx.__version__,
                            time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        atomic_write(os.path.join(out, MANIFEST), manifest.to_json())
    except OSError as e:  # a missing source, an unwritable OUT, a full disk
        raise CspxError(f"{e.filename or out}: {e.strerror or e}") from e
    secs = time.time() - t0
    print(f"{'split':<6} {'classes':>8} {'samples':>9} {'shards':>7} {'MB':>9} {'excluded':>9} "
          f"{'written now':>12}")
    for s, info in splits.items():
        print(f"{s:<6} {n_classes[s]:>8} {info.samples:>9} {len(info.shards):>7} "
              f"{info.bytes / MB:>9.1f} {len(info.excluded):>9} {jobs[s].written:>12}")
        if info.excluded:
            print(f"{s}: left out {scan.summarize(info.excluded)} (listed in "
                  f"{os.path.join(out, s, EXCLUDED)})")
    print(f"verified; {os.path.join(out, MANIFEST)} written in {secs:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
