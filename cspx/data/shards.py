"""Sharded datasets: the on-disk format, writing one shard, the manifest, and the start-up check.

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

Start-up check (`quick_check`), per shard: the tar and its .idx exist, their sizes equal the
manifest's, and a sha256 of their first and last QUICK_BYTES equals the manifest's. That reads
4 x 64 KiB per shard whatever the shard size, and finds a truncated or extended shard, a shard
replaced by another one, and damage in its first or last 64 KiB. It cannot find damage in the
middle of a shard of the right size (bit rot, a torn write): the full sha256 of every file is in
the manifest, checked by make_shards at the end of writing and by `make_shards.py --verify`; at
run time such damage shows up as an image that fails to decode, or not at all (a flipped bit in
JPEG entropy data often still decodes, to wrong pixels). The table, samples.npy, which
decides every read, is checked in full (size, sha256, and every sample inside its shard) when a
split is opened (shard_reader.ShardSplit).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from cspx.errors import CspxError
from cspx.files import atomic_write, fsync_dir, temp_path

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


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
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


def quick_check(root: str, split: str, manifest: Manifest) -> Dict[str, str]:
    """{'<split>/<name>.tar': reason} for the split's shards failing the start-up check.
    Threads: on network storage the check is latency-bound (6 operations per shard)."""
    split_dir = os.path.join(root, split)
    shards = manifest.splits[split].shards
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        reasons = list(pool.map(lambda s: check_shard(split_dir, s, manifest.quick_bytes), shards))
    return {f"{split}/{s.name}.tar": r for s, r in zip(shards, reasons) if r is not None}


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it (tarfile writes)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def member_bytes(jpg_size: int, path: str) -> int:
    """How much one sample adds to a tar: a 512-byte header per member plus its padded data
    (cls and lab fit one block; names are short, so no long-name headers)."""
    return 4 * BLOCK + _padded(jpg_size) + 2 * BLOCK + _padded(len(path.encode("utf-8")))


class ShardWriter:
    """Writes <split_dir>/<name>.tar under a temp name, then its .idx, then renames the tar."""

    def __init__(self, split_dir: str, name: str, shard: int):
        self.split_dir, self.name, self.shard = split_dir, name, shard
        self.tar_path = os.path.join(split_dir, name + ".tar")
        self.tmp = temp_path(self.tar_path)
        self._file = open(self.tmp, "wb")
        self._out = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.GNU_FORMAT)
        self.rows: List[tuple] = []
        self.first: Optional[int] = None
        self._index: List[str] = []
        self.closed = False

    @property
    def bytes(self) -> int:
        return self._out.n

    def _add(self, name: str, data: bytes) -> Tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        return self._tar.offset - _padded(len(data)), len(data)  # where the data starts

    def add(self, position: int, label: int, path: str, data: bytes) -> None:
        if self.first is None:
            self.first = position
        elif position != self.first + len(self.rows):
            raise ValueError(f"{self.name}: position {position} does not follow the last one")
        key, enc = sample_key(position), path.encode("utf-8")
        parts = {"jpg": data, "cls": str(label).encode("ascii"),
                 "lab": struct.pack("<ii", label, position), "path.txt": enc}
        where = {ext: self._add(f"{key}.{ext}", parts[ext]) for ext in COMPONENTS}
        self._index.append(" ".join(f"{ext} {off} {size} {key}.{ext}"
                                    for ext, (off, size) in where.items()))
        self.rows.append((self.shard, label, where["jpg"][0], where["jpg"][1],
                          where["path.txt"][0], where["path.txt"][1]))

    def close(self) -> Tuple[ShardInfo, np.ndarray]:
        """Finish the shard; returns its manifest entry and its rows of the table."""
        self._tar.close()  # end-of-archive blocks, padded to tarfile's 10 KiB record
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index = f"{INDEX_VERSION} {len(self.rows)}\n" + "".join(ln + "\n" for ln in self._index)
        idx_path = os.path.join(self.split_dir, self.name + ".idx")
        atomic_write(idx_path, index)
        size = self._out.n
        info = ShardInfo(self.name, self.first or 0, len(self.rows), size, self._out.h.hexdigest(),
                         quick_hash(self.tmp, size), os.path.getsize(idx_path),
                         hashlib.sha256(index.encode()).hexdigest(),
                         quick_hash(idx_path, os.path.getsize(idx_path)))
        os.replace(self.tmp, self.tar_path)
        fsync_dir(self.split_dir)
        self.closed = True
        return info, np.array(self.rows, dtype=SAMPLE_DTYPE)

    def abort(self) -> None:
        """Drop an unfinished shard's temp file; nothing once close() has finished."""
        if self.closed:
            return
        self.closed = True
        try:
            self._file.close()
            os.remove(self.tmp)
        except OSError:
            pass


def index_of_tar(tar_path: str) -> Tuple[str, List[tarfile.TarInfo]]:
    """The DALI index text that describes the tar as it is, and its members (for --verify)."""
    lines: List[str] = []
    members: List[tarfile.TarInfo] = []
    key = None
    with tarfile.open(tar_path, "r:") as t:
        for m in t:
            members.append(m)
            base = os.path.basename(m.name)
            k, _, ext = base.partition(".")
            entry = f"{ext} {m.offset_data} {m.size} {m.name}"
            if k == key:
                lines[-1] += " " + entry
            else:
                key = k
                lines.append(entry)
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(ln + "\n" for ln in lines), members


def verify_shard(split_dir: str, s: ShardInfo, rows: np.ndarray) -> Optional[str]:
    """The full check: both files' sha256, and the tar's members exactly as the index and the
    table say (names, offsets, sizes, labels, positions). None if all agree, else why not."""
    base = os.path.join(split_dir, s.name)
    try:
        if os.path.getsize(base + ".tar") != s.bytes:
            return f"{s.name}.tar is {os.path.getsize(base + '.tar')} bytes, expected {s.bytes}"
        if file_sha256(base + ".tar") != s.sha256:
            return f"{s.name}.tar: sha256 differs from the manifest (corrupt)"
        if file_sha256(base + ".idx") != s.index_sha256:
            return f"{s.name}.idx: sha256 differs from the manifest (corrupt)"
        index, members = index_of_tar(base + ".tar")
        with open(base + ".idx", "r", encoding="utf-8") as f:
            if f.read() != index:
                return f"{s.name}.idx does not describe {s.name}.tar"
        if len(members) != 4 * len(rows) or len(rows) != s.samples:
            return f"{s.name}.tar holds {len(members)} members for {len(rows)} samples"
        with open(base + ".tar", "rb") as f:
            for j, row in enumerate(rows):
                m = members[4 * j: 4 * j + 4]
                key = sample_key(s.first + j)
                if [x.name for x in m] != [f"{key}.{e}" for e in COMPONENTS]:
                    return f"{s.name}.tar: sample {s.first + j} has members {[x.name for x in m]}"
                if (m[0].offset_data, m[0].size, m[3].offset_data, m[3].size) != (
                        row["offset"], row["size"], row["path_offset"], row["path_size"]):
                    return f"{s.name}.tar: sample {s.first + j} is not where the table says"
                f.seek(m[1].offset_data)
                cls = f.read(m[1].size)
                f.seek(m[2].offset_data)
                lab = struct.unpack("<ii", f.read(8))
                if lab != (int(row["label"]), s.first + j) or cls != str(lab[0]).encode():
                    return f"{s.name}.tar: sample {s.first + j} has label/position {lab}, " \
                           f"expected {(int(row['label']), s.first + j)}"
    except (OSError, tarfile.TarError, struct.error) as e:
        return f"{s.name}: {type(e).__name__}: {e}"
    return None
