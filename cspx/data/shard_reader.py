"""Sharded datasets, read at the start of a run and at every step: the reader side of the format
in shard_format.py (shard_writer.py is the writer). One split of a sharded dataset, as the
loaders see it: labels, random access to the image bytes, and the original paths, without
reading any per-sample text at start.

Opening a split reads the manifest, runs the start-up check on every shard
(shard_format.failing_shards) and loads the per-sample table (samples.npy, 32 bytes a sample),
checking it in full. A shard that fails the check is handled by `bad_shards` (the recipe's
data.bad_shards): 'refuse' stops with one line naming it; 'exclude' names it in a warning and
leaves its samples out of the split.

Sample i of a ShardSplit is row i of the table of the shards kept; `positions[i]` is its position
in the split as written (the KEY in the tar and the second int of KEY.lab), which differs from i
only after a shard was excluded.

Reading is by offset (os.pread) from a per-process cache of open shard files. The cache is
opened lazily and belongs to the process that opened it: a DataLoader worker (forked or spawned)
starts with an empty one, so no file offset or descriptor is ever shared between processes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import OrderedDict
from typing import ClassVar, Dict, List, Optional

import numpy as np

from cspx.data.shard_format import (
    SAMPLE_DTYPE,
    TABLE,
    Manifest,
    ShardInfo,
    failing_shards,
    read_manifest,
)
from cspx.errors import CspxError

log = logging.getLogger("cspx")
BAD_SHARDS = ("refuse", "exclude")
MAX_OPEN_FILES = 64  # per process; each DataLoader worker holds its own


def load_table(root: str, split: str, m: Manifest) -> np.ndarray:
    """samples.npy of a split, checked against the manifest: size, sha256, per-shard counts,
    and every sample's bytes inside its shard. A bad table is always refused: it decides every
    read, and no shard can be left out to work around it."""
    info = m.splits[split]
    path = os.path.join(root, split, TABLE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CspxError(f"{path}: cannot read the sample table ({e.strerror or e})") from None
    if len(raw) != info.table_bytes or hashlib.sha256(raw).hexdigest() != info.table_sha256:
        raise CspxError(f"{path}: does not match the manifest ({len(raw)} bytes, expected "
                        f"{info.table_bytes}, or another checksum); rerun scripts/make_shards.py")
    table = np.load(io.BytesIO(raw), allow_pickle=False)
    if table.dtype != SAMPLE_DTYPE or table.shape != (info.samples,):
        raise CspxError(f"{path}: table of {table.dtype} {table.shape}, expected {info.samples} "
                        f"rows of the cspx sample layout")
    counts = np.bincount(table["shard"], minlength=len(info.shards))
    sizes = np.array([s.bytes for s in info.shards], dtype=np.uint64)
    bound = sizes[np.minimum(table["shard"], len(info.shards) - 1)]
    inside = ((table["shard"] < len(info.shards)) & (table["offset"] + table["size"] <= bound)
              & (table["path_offset"] + table["path_size"] <= bound))
    if (counts[:len(info.shards)].tolist() != [s.samples for s in info.shards]
            or not inside.all() or not (table["label"] >= 0).all()
            or not (table["label"] < len(m.classes)).all()):
        raise CspxError(f"{path}: rows disagree with the manifest's shards or classes")
    return table


class ShardSplit:
    """One split ('train', 'val') of the sharded dataset at `root`: a `loader.DataSplit`, as a
    folder's `index.FolderSplit` is, so every loader reads either."""

    format: ClassVar[str] = "shards"

    def __init__(self, root: str, split: str, bad_shards: str = "refuse",
                 manifest: Optional[Manifest] = None, warn: bool = True):
        if bad_shards not in BAD_SHARDS:
            raise CspxError(f"data.bad_shards: {bad_shards!r} is not one of "
                            f"{', '.join(BAD_SHARDS)}")
        self.root = os.path.abspath(os.path.expanduser(root))
        self.split = split
        self.manifest = m = manifest or read_manifest(self.root)
        if split not in m.splits:
            raise CspxError(f"{self.root}: no {split!r} split in the sharded dataset (it has "
                            f"{', '.join(sorted(m.splits)) or 'none'})")
        info = m.splits[split]
        self.classes: List[str] = list(m.classes)
        bad = failing_shards(self.root, split, m)
        table = load_table(self.root, split, m)
        if bad and bad_shards == "refuse":
            first = sorted(bad)[0]
            more = f" (and {len(bad) - 1} more shards)" if len(bad) > 1 else ""
            raise CspxError(f"{os.path.join(self.root, first)}: {bad[first]}{more}; set "
                            f"data.bad_shards=exclude to train without it, or rerun "
                            f"scripts/make_shards.py to rewrite it")
        self.excluded: Dict[str, str] = dict(info.excluded)
        keep = np.ones(len(info.shards), dtype=bool)
        for k, s in enumerate(info.shards):
            rel = f"{split}/{s.name}.tar"
            if rel in bad:
                keep[k] = False
                self.excluded[rel] = f"{bad[rel]}; its {s.samples} samples left out"
        self.shards: List[ShardInfo] = [s for s, k in zip(info.shards, keep) if k]
        if not self.shards:
            raise CspxError(f"{self.root}: every {split} shard failed the start-up check")
        mask = keep[table["shard"]]
        self._rows = table[mask] if not mask.all() else table
        self.positions = np.flatnonzero(mask).astype(np.int64)  # position as written, per sample
        self.labels = self._rows["label"].astype(np.int64)
        if bad and warn:
            log.warning(f"{self.root}: excluding {len(bad)} {split} shard(s) that failed the "
                        f"start-up check, {int((~mask).sum())} samples: " +
                        "; ".join(f"{k} ({v})" for k, v in sorted(bad.items())[:3]))
        self._tars = [os.path.join(self.root, split, s.name + ".tar") for s in info.shards]
        self._files: "OrderedDict[int, int]" = OrderedDict()
        self._pid = -1
        self._picked = ""  # select(): a hash of the positions selected

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tar_paths(self) -> List[str]:
        """The kept shards' .tar files, in order (with index_paths(): fn.readers.webdataset)."""
        return [os.path.join(self.root, self.split, s.name + ".tar") for s in self.shards]

    def index_paths(self) -> List[str]:
        return [os.path.join(self.root, self.split, s.name + ".idx") for s in self.shards]

    def subset(self, n: int) -> "ShardSplit":
        """The first n samples (for --limit): a copy sharing nothing open."""
        other = object.__new__(ShardSplit)
        other.__dict__.update(self.__getstate__())
        other._rows, other.positions, other.labels = (self._rows[:n], self.positions[:n],
                                                      self.labels[:n])
        return other

    def select(self, indices: np.ndarray) -> "ShardSplit":
        """The samples at `indices` (ascending), in this order: a copy sharing nothing open,
        whose fingerprint names the selection (cspx.data.holdout)."""
        idx = np.asarray(indices, dtype=np.int64)
        other = object.__new__(ShardSplit)
        other.__dict__.update(self.__getstate__())
        other._rows, other.positions, other.labels = (self._rows[idx], self.positions[idx],
                                                      self.labels[idx])
        other._picked = hashlib.sha256(other.positions.tobytes()).hexdigest()[:16]
        return other

    def __getstate__(self) -> dict:
        """Pickled into spawned workers without the open files: each process opens its own."""
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = OrderedDict(), -1
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # first use in this process, or in a forked child, whose
            for old in self._files.values():  # inherited copies of the descriptors it closes
                os.close(old)
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            if len(self._files) >= MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            fd = self._files[shard] = os.open(self._tars[shard], os.O_RDONLY)
        else:
            self._files.move_to_end(shard)
        return fd

    def _pread(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        while len(data) < size:  # pread may return less; 0 means the file ends early
            more = os.pread(self._fd(shard), size - len(data), offset + len(data))
            if not more:
                raise OSError(f"{self._tars[shard]}: ends at byte {offset + len(data)}, inside a "
                              f"sample of {size} bytes at {offset} (truncated after the check?)")
            data += more
        return data

    def read(self, i: int) -> bytes:
        """The original image file's bytes of sample i."""
        r = self._rows[i]
        return self._pread(int(r["shard"]), int(r["offset"]), int(r["size"]))

    def name(self, i: int) -> str:
        """Sample i's original path relative to the split folder ('n01440764/x.JPEG')."""
        r = self._rows[i]
        return self._pread(int(r["shard"]), int(r["path_offset"]),
                           int(r["path_size"])).decode("utf-8")

    def location(self, i: int) -> str:
        """For messages: the original path and the shard holding it."""
        tar = self._tars[int(self._rows[i]["shard"])]
        try:
            what = self.name(i)
        except OSError:  # the shard lost its end after the start-up check
            what = "its path unreadable"
        return f"{what} (sample {int(self.positions[i])} in {tar})"

    def paths(self) -> List[str]:
        """Every sample's original path, in order (reads them all: for evaluation reports)."""
        return [self.name(i) for i in range(len(self))]

    def fingerprint(self) -> str:
        """Identifies the samples and labels of this split cheaply: from the manifest's per-shard
        checksums and the class list, not from per-sample data. 16 hex digits."""
        info = self.manifest.splits[self.split]
        key = {"split": self.split, "classes": self.classes, "table": info.table_sha256,
               "shards": [(s.name, s.sha256, s.samples) for s in self.shards], "n": len(self)}
        if self._picked:  # a selection: which samples (absent otherwise, so a whole split's
            key["picked"] = self._picked  # fingerprint stays what it was)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._files, self._pid = OrderedDict(), -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass
