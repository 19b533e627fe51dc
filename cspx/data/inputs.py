"""What predict.py classifies: its PATH arguments, as the splits the evaluation loaders read.

PATH is one of:
  an image file        any name (one that does not decode gets an error row)
  a folder             its files named *.jpg, .jpeg, .png, .bmp or .webp (any case), searched
                       recursively (symlinks followed once), in sorted order; names starting
                       with '.' are skipped
  a list (.txt, .lst)  one image path per line, relative ones from the list's folder; blank
                       lines and lines starting with '#' are skipped
  a sharded dataset    scripts/make_shards.py's output folder (its shards.json): every split's
                       samples; or one split's folder inside it (ROOT/val)

Loose files (the first three kinds) become one `folder` split, in the order given, each path
once; a sharded dataset's splits are read as they are. Each sample gets its row number in
the output (`Source.rows`), so whatever order or rank classifies it, the output keeps the order
of the arguments. A PATH that does not exist, or that holds no images, is bad input (one line,
exit 2); a listed file that turns out missing or unreadable only gets an error row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Sequence

import numpy as np

from cspx.data.index import FolderSplit
from cspx.data.loader import DataSplit, contiguous_share
from cspx.data.shard_format import MANIFEST, MARKER, read_manifest
from cspx.data.shard_reader import ShardSplit
from cspx.errors import CspxError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LIST_EXTENSIONS = (".txt", ".lst")


@dataclass
class Source:
    """One split to classify: sample i is output row `rows[i]`, named `path(i)`."""
    split: DataSplit
    rows: np.ndarray                 # int64 (len(split),)
    path: Callable[[int], str]

    def select(self, indices: np.ndarray) -> "Source":
        """The samples at `indices` (ascending), keeping their rows and paths."""
        idx = np.asarray(indices, dtype=np.int64)
        return Source(self.split.select(idx), self.rows[idx], partial(_at, self.path, idx))


def _at(path: Callable[[int], str], idx: np.ndarray, i: int) -> str:
    """The name of a selection's sample i: the original's sample idx[i] (Source.select)."""
    return path(int(idx[i]))


def rank_share(src: Source, rank: int, world: int) -> Source:
    """Rank `rank`'s share of `src` under torchrun: the evaluation loaders' split between ranks
    (loader.contiguous_share), so a rank classifies the images it would evaluate."""
    return src.select(np.asarray(contiguous_share(len(src.split), rank, world), dtype=np.int64))


def _is_shards(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in (MANIFEST, MARKER))


def _is_shard_split(folder: str) -> bool:
    """Whether `folder` is one split's folder of a sharded dataset (ROOT/val)."""
    parent, name = os.path.split(os.path.abspath(folder))
    return _is_shards(parent) and name in read_manifest(parent).splits


def _walk(folder: str) -> List[str]:
    """Image files under `folder`, sorted by path, each real folder visited once."""
    out: List[str] = []
    seen = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(top, f) for f in files
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(out, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _read_list(path: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise CspxError(f"{path}: cannot read the list of paths ({getattr(e, 'strerror', '') or e})"
                        ) from None
    base = os.path.dirname(path)
    return [ln if os.path.isabs(ln) else os.path.normpath(os.path.join(base, ln))
            for ln in lines if ln and not ln.startswith("#")]


def _shard_sources(path: str, rows_from: int) -> List[Source]:
    parent, name = os.path.split(os.path.normpath(path))
    parent = parent or "."
    if _is_shards(path):
        root, splits = path, sorted(read_manifest(path).splits)
    else:  # one split's folder inside a sharded dataset
        root, splits = parent, [name]
    out = []
    for s in splits:
        split = ShardSplit(root, s)
        base = os.path.join(root, s)

        def name_of(i: int, split=split, base=base) -> str:
            return os.path.join(base, split.name(i))
        out.append(Source(split, np.arange(rows_from, rows_from + len(split)), name_of))
        rows_from += len(split)
    return out


def collect(paths: Sequence[str]) -> List[Source]:
    """The sources PATH arguments name (module docstring), in order."""
    sources: List[Source] = []
    loose: List[str] = []      # the current run of loose files
    seen = set()
    rows = 0

    def flush() -> None:
        nonlocal rows
        if not loose:
            return
        absolute = [os.path.abspath(p) for p in loose]
        root = os.path.commonpath([os.path.dirname(a) for a in absolute])
        split = FolderSplit(root, ["unlabelled"], [os.path.relpath(a, root) for a in absolute],
                            np.zeros(len(absolute), dtype=np.int64))
        names = list(loose)
        sources.append(Source(split, np.arange(rows, rows + len(names)), names.__getitem__))
        rows += len(names)
        loose.clear()

    def add(files: Sequence[str]) -> None:
        for f in files:
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                loose.append(f)

    for p in paths:
        if os.path.isdir(p) and (_is_shards(p) or _is_shard_split(p)):
            flush()
            found = _shard_sources(p, rows)
            rows += sum(len(s.split) for s in found)
            sources.extend(found)
            continue
        if os.path.isdir(p):
            files = _walk(p)
            if not files:
                raise CspxError(f"{p}: no image files in it ({', '.join(IMAGE_EXTENSIONS)}, "
                                f"searched recursively)")
        elif os.path.isfile(p) and p.lower().endswith(LIST_EXTENSIONS):
            files = _read_list(p)
            if not files:
                raise CspxError(f"{p}: the list of paths is empty")
        elif os.path.isfile(p):
            files = [p]
        else:
            raise CspxError(f"{p}: no such file or folder")
        add(files)
    flush()
    return sources
