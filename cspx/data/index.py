"""Folder datasets, at the start of a run and of validate.py: a folder indexed (which files
exist, their labels, and which are excluded as unreadable) into its `FolderSplit`, the
`loader.DataSplit` of a folder.

Both loaders (torch and DALI) read the same `FolderSplit`, so label k means the same wnid in
both. Labels come from a synset list when one is given (`data.classes` / `--classes`): line k of
that file is class k, so a folder holding only some of the 1000 ImageNet classes still gets the
standard indices. Without it, label k is the k-th sorted class folder (torchvision's rule).

Listing 1.28M files and checking their first and last bytes takes a while on network storage, so
the listing and the quick-scan verdicts are cached in `$CSPX_CACHE` (default ~/.cache/cspx), keyed
by the folder's absolute path and invalidated when any class folder's mtime changes (adding or
removing a file changes its folder's mtime).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence

import numpy as np

from cspx import watchdog
from cspx.data import scan
from cspx.data.loader import listing_hash
from cspx.errors import CspxError
from cspx.files import atomic_write

log = logging.getLogger("cspx")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("CSPX_CACHE", "~/.cache/cspx"))


@dataclass
class FolderSplit:
    """Files under `root` with labels. `files[i]` is relative to root, e.g. 'n01440764/x.JPEG'.
    A `loader.DataSplit`, as `shard_reader.ShardSplit` is."""

    format: ClassVar[str] = "folder"
    root: str
    classes: List[str]            # classes[k] is the wnid of label k
    files: List[str]
    labels: np.ndarray            # int64, shape (len(files),)
    excluded: Dict[str, str] = field(default_factory=dict)  # rel path -> reason, not in files

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def read(self, i: int) -> bytes:
        with open(self.path(i), "rb") as f:
            return f.read()

    def name(self, i: int) -> str:
        return self.files[i]

    def location(self, i: int) -> str:
        return self.path(i)

    def fingerprint(self) -> str:
        """Identity of the contents as training sees them: files, labels and class list."""
        return listing_hash(self.files, self.labels.tolist(), "\n".join(self.classes))

    def subset(self, n: int) -> "FolderSplit":
        """The first n files (sorted order); for `--limit`."""
        return FolderSplit(self.root, self.classes, self.files[:n], self.labels[:n], self.excluded)

    def select(self, indices: np.ndarray) -> "FolderSplit":
        """The samples at `indices` (ascending), in this order (cspx.data.holdout)."""
        idx = np.asarray(indices, dtype=np.int64)
        return FolderSplit(self.root, self.classes, [self.files[i] for i in idx.tolist()],
                           self.labels[idx], self.excluded)

    def write_file_list(self, path: str, label_is_position: bool = False) -> None:
        """DALI `file_list`: one 'relative/path label' per line. With label_is_position the second
        column is the sample's position in this split (used to recover paths and to map labels)."""
        atomic_write(path, "".join(f"{rel} {i if label_is_position else lab}\n" for i, (rel, lab)
                                   in enumerate(zip(self.files, self.labels.tolist()))),
                     durable=False)


def read_classes_file(path: str) -> List[str]:
    """A synset list: the first whitespace-separated token of each non-empty line is a wnid."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            wnids = [ln.split()[0] for ln in f if ln.strip()]
    except OSError as e:
        raise CspxError(f"{path}: cannot read class list ({e.strerror or e})") from None
    if not wnids:
        raise CspxError(f"{path}: class list is empty")
    dup = sorted({w for w in wnids if wnids.count(w) > 1}) if len(set(wnids)) != len(wnids) else []
    if dup:
        raise CspxError(f"{path}: class list repeats {', '.join(dup[:3])}")
    return wnids


def _class_dirs(root: str) -> List[str]:
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise CspxError(f"{root}: cannot list data folder ({e.strerror or e})") from None


def resolve_split_dir(path: str, split: str) -> str:
    """`path/<split>/<wnid>/` if it exists, else `path/<wnid>/`. Raises if neither holds classes."""
    if not os.path.isdir(path):
        raise CspxError(f"{path}: data folder does not exist")
    sub = os.path.join(path, split)
    if os.path.isdir(sub) and _class_dirs(sub):
        return sub
    if _class_dirs(path) and split not in _class_dirs(path):
        return path
    raise CspxError(f"{path}: expected class folders <wnid>/ or {split}/<wnid>/ in it")


def _list_files(root: str, wnids: Sequence[str]) -> List[str]:
    files: List[str] = []
    for w in wnids:
        watchdog.progress("listing data.root's class folders")
        with os.scandir(os.path.join(root, w)) as it:
            names = sorted(e.name for e in it
                           if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        files.extend(f"{w}/{n}" for n in names)
    return files


def _cached_listing(root: str, wnids: Sequence[str], workers: int) -> Dict:
    """{'files': [...], 'bad': {rel: reason}} from the cache, or by listing and quick-scanning."""
    stamp = {w: os.stat(os.path.join(root, w)).st_mtime_ns for w in wnids}
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), "index", f"{key}.json")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("version") == CACHE_VERSION and cached.get("stamp") == stamp:
            return cached
    except (OSError, ValueError):
        pass
    files = _list_files(root, wnids)
    verdicts = scan.scan_files(root, files, deep=False, workers=workers,
                               progress=_Progress(f"{root}: quick scan", len(files)))
    bad = {rel: r for rel, r in verdicts.items() if r is not None}
    entry = {"version": CACHE_VERSION, "root": os.path.abspath(root), "stamp": stamp,
             "files": files, "bad": bad}
    try:  # the cache is an optimisation: a read-only home must not stop a run
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, json.dumps(entry), durable=False)
    except OSError:
        pass
    return entry


class _Progress:
    """A scan's progress as a log line every 30 s (large datasets on slow storage)."""

    def __init__(self, what: str, total: int, every: float = 30.0):
        self.what, self.total, self.every = what, total, every
        self.done, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        watchdog.progress(self.what)
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            log.info(f"{self.what}: {self.done:,} of {self.total:,} files checked")


def build_index(root: str, classes: Optional[Sequence[str]] = None,
                exclude: Optional[Dict[str, str]] = None, workers: int = 8,
                warn: bool = True) -> FolderSplit:
    """Index `root/<wnid>/*.{jpg,jpeg,png}` (any case): the folder's split.

    classes: the synset list fixing label indices; every class folder must be in it.
    exclude: extra {rel: reason} to leave out (from `scripts/check_dataset.py`).
    Files failing the quick scan are excluded too, and named in one warning.
    """
    root = os.path.abspath(os.path.expanduser(root))
    present = _class_dirs(root)
    if not present:
        raise CspxError(f"{root}: no class folders found")
    if classes is not None:
        pos = {w: k for k, w in enumerate(classes)}
        unknown = [w for w in present if w not in pos]
        if unknown:
            raise CspxError(f"{root}: class folder {unknown[0]!r} is not in the class list"
                            f"{f' ({len(unknown)} such folders)' if len(unknown) > 1 else ''}")
        class_list = list(classes)
    else:
        pos = {w: k for k, w in enumerate(present)}
        class_list = present
    listing = _cached_listing(root, present, workers)
    bad: Dict[str, str] = dict(listing["bad"])
    if exclude:
        bad.update({rel: r for rel, r in exclude.items() if rel not in bad})
    files = [rel for rel in listing["files"] if rel not in bad]
    if not files:
        raise CspxError(f"{root}: no readable images found")
    labels = np.array([pos[rel.split("/", 1)[0]] for rel in files], dtype=np.int64)
    listed = set(listing["files"])
    excluded = {rel: r for rel, r in bad.items() if rel in listed}
    if excluded and warn:
        log.warning(f"{root}: excluding {scan.summarize(excluded)}")
    return FolderSplit(root, class_list, files, labels, excluded)
