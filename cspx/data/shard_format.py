"""Sharded datasets, at the start of a run and in scripts/make_shards.py: the on-disk format
both sides follow (the writer, shard_writer.py; the reader, shard_reader.py), the manifest, and
the start-up check.

A sharded dataset is a folder ROOT, written by scripts/make_shards.py:
  .cspx-shards                  marker: cspx created ROOT (files.claim_folder)
  shards.json                   the manifest (`Manifest`)
  synsets.txt                   the class list, line k = label k ('wnid [name]')
  <split>/<split>-NNNNNN.tar    samples, GNU tar, about --shard-size MB each
  <split>/<split>-NNNNNN.idx    the tar's index for DALI's fn.readers.webdataset
  <split>/samples.npy           per-sample table (SAMPLE_DTYPE): row p is the sample at position p
  <split>/excluded.txt          files the dataset check left out ('wnid/file<TAB>reason')

The sample at position p of a split (KEY = f"{p:08d}") is four consecutive tar members:
  KEY.jpg       the original image file's bytes, untouched
  KEY.cls       the label as decimal text (webdataset's convention: it decodes to an int)
  KEY.lab       8 bytes, struct '<ii' (label, p): DALI reads it as int32 of shape (2,)
  KEY.path.txt  the original path relative to the split folder, UTF-8, e.g. 'n01440764/x.JPEG'
Member names hold no spaces and mtime is 0, so a shard written twice is the same bytes.

Start-up check (`failing_shards`), per shard: the tar and its .idx exist, their sizes equal the
manifest's, and a sha256 of their first and last QUICK_BYTES equals the manifest's. That reads
4 x 64 KiB per shard whatever the shard size, and finds a truncated or extended shard, a shard
replaced by another one, and damage in its first or last 64 KiB. It cannot find damage in the
middle of a shard of the right size (bit rot, a torn write): the full sha256 of every file is in
the manifest, checked by make_shards at the end of writing and by `make_shards.py --verify`
(shard_writer.verify_shard); at run time such damage shows up as an image that fails to decode,
or not at all (a flipped bit in JPEG entropy data often still decodes, to wrong pixels). The
table, samples.npy, which decides every read, is checked in full (size, sha256, and every sample
inside its shard) when a split is opened (shard_reader.ShardSplit).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from cspx import watchdog
from cspx.errors import CspxError

FORMAT = "cspx-shards"
FORMAT_VERSION = 1
MANIFEST = "shards.json"
MARKER = ".cspx-shards"
TABLE = "samples.npy"
EXCLUDED = "excluded.txt"
SYNSETS = "synsets.txt"
QUICK_BYTES = 64 * 1024
INDEX_VERSION = "v1.2"           # DALI's webdataset index format
COMPONENTS = ("jpg", "cls", "lab", "path.txt")
BLOCK = 512                       # tar block size: every member's data starts on one
# One row per sample, 32 bytes, no padding: 40 MB for ImageNet's 1.28M training images.
SAMPLE_DTYPE = np.dtype([("shard", "<u4"), ("label", "<i4"), ("offset", "<u8"), ("size", "<u4"),
                         ("path_offset", "<u8"), ("path_size", "<u4")])


def sample_key(position: int) -> str:
    return f"{position:08d}"


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}"


@dataclass
class ShardInfo:
    """One shard in the manifest. Sizes in bytes; checksums are sha256 hex digests."""
    name: str            # 'train-000000': files <split>/<name>.tar and <split>/<name>.idx
    first: int           # position of its first sample; it holds [first, first + samples)
    samples: int
    bytes: int           # size of the .tar
    sha256: str          # of the whole .tar
    quick: str           # `quick_hash` of the .tar
    index_bytes: int
    index_sha256: str
    index_quick: str


@dataclass
class SplitInfo:
    samples: int
    bytes: int                   # all of the split's .tar files together
    order: str                   # 'shuffled' (seeded permutation) or 'sorted' (by path)
    seed: Optional[int]
    table_bytes: int             # samples.npy
    table_sha256: str
    excluded: Dict[str, str] = field(default_factory=dict)  # path -> why make_shards left it out
    shards: List[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    classes: List[str]           # classes[k] is the wnid of label k
    splits: Dict[str, SplitInfo]
    shard_size_mb: float
    source: Dict[str, str]       # split -> the folder or tar it was made from
    cspx_version: str
    created: str
    quick_bytes: int = QUICK_BYTES
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"


def read_manifest(root: str) -> Manifest:
    """The manifest of the sharded dataset at `root`, or a one-line CspxError."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CspxError(f"{root}: no {MANIFEST}; not a complete sharded dataset "
                        f"(scripts/make_shards.py writes it last)") from None
    except (OSError, ValueError) as e:
        raise CspxError(f"{path}: cannot read the manifest ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CspxError(f"{path}: not a cspx shard manifest (format is not {FORMAT!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise CspxError(f"{path}: format_version {d.get('format_version')!r}; this cspx reads "
                        f"version {FORMAT_VERSION}")
    try:
        splits = {s: SplitInfo(**{**v, "shards": [ShardInfo(**x) for x in v["shards"]]})
                  for s, v in d["splits"].items()}
        return Manifest(**{**d, "splits": splits})
    except (KeyError, TypeError) as e:
        raise CspxError(f"{path}: damaged manifest ({type(e).__name__}: {e})") from None


def quick_hash(path: str, size: int, q: int = QUICK_BYTES) -> str:
    """sha256 of a file's first q bytes and its last q bytes (the whole file when it is at most
    2q long). `size` is the file's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(q))
        f.seek(max(q, size - q))
        h.update(f.read())
    return h.hexdigest()


def _check_file(path: str, size: int, quick: str, q: int) -> Optional[str]:
    try:
        actual = os.path.getsize(path)
        if actual != size:
            return (f"{os.path.basename(path)} is {actual} bytes, the manifest says {size} "
                    f"({'truncated' if actual < size else 'grown'} or replaced)")
        if quick_hash(path, size, q) != quick:
            return (f"{os.path.basename(path)}: checksum of its first and last {q // 1024} KiB "
                    f"differs from the manifest (corrupt or replaced)")
    except OSError as e:
        return f"{os.path.basename(path)}: {e.strerror or e}"
    return None


def check_shard(split_dir: str, s: ShardInfo, q: int = QUICK_BYTES) -> Optional[str]:
    """None if the shard passes the start-up check (module doc), else why not."""
    base = os.path.join(split_dir, s.name)
    return (_check_file(base + ".tar", s.bytes, s.quick, q)
            or _check_file(base + ".idx", s.index_bytes, s.index_quick, q))


def failing_shards(root: str, split: str, manifest: Manifest) -> Dict[str, str]:
    """{'<split>/<name>.tar': reason} for the split's shards failing the start-up check.
    Threads: on network storage the check is latency-bound (6 operations per shard)."""
    split_dir = os.path.join(root, split)
    shards = manifest.splits[split].shards
    reasons = []
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        for r in pool.map(lambda s: check_shard(split_dir, s, manifest.quick_bytes), shards):
            reasons.append(r)
            watchdog.progress(f"checking the {split} shards")
    return {f"{split}/{s.name}.tar": r for s, r in zip(shards, reasons) if r is not None}


