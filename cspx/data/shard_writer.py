"""Sharded datasets, written by scripts/make_shards.py: the writer side of the format in
shard_format.py (one shard's tar, its DALI index and its rows of the sample table) and the full
verification of a written shard (`make_shards.py --verify`). Runs read shards through
shard_reader.py.
"""
from __future__ import annotations

import builtins  # `bytes` in ShardWriter is its property: the type is builtins.bytes
import hashlib
import io
import os
import struct
import tarfile
from typing import List, Optional, Tuple

import numpy as np

from cspx.data.shard_format import (
    BLOCK,
    COMPONENTS,
    INDEX_VERSION,
    SAMPLE_DTYPE,
    ShardInfo,
    quick_hash,
    sample_key,
)
from cspx.files import atomic_write, fsync_dir, temp_path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



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
        # tarfile writes through write() and tell() alone; typeshed's protocol for fileobj also
        # asks for read, seek and close, which a write-only hashing wrapper does not have
        self._tar = tarfile.open(fileobj=self._out, mode="w",  # type: ignore[call-overload]
                                 format=tarfile.GNU_FORMAT)
        self.rows: List[tuple] = []
        self.first: Optional[int] = None
        self._index: List[str] = []
        self.closed = False

    @property
    def bytes(self) -> int:
        return self._out.n

    def _add(self, name: str, data: builtins.bytes) -> Tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        return self._tar.offset - _padded(len(data)), len(data)  # where the data starts

    def add(self, position: int, label: int, path: str, data: builtins.bytes) -> None:
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
