"""A validation split held out of the training images, at the start of a run (`data.val_split`)
and of validate.py (`--val-split`), for a dataset that comes without val/.

Per class, the images are ordered by a keyed hash of (seed, sample name) and the first
round(fraction x n) of them are held out. The name is the path relative to the split folder
('n01440764/x.JPEG'), which a folder and the shards made from it share. So the split depends
only on the names, their labels, the fraction and the seed: not on the listing order, the world
size, the format, nor on the other classes; adding images to one class moves only that class's.
Every rank computes the same split from the same listing, and a resumed run gets the same one
(the resume check compares the training set's fingerprint, which changes with it).
"""
from __future__ import annotations

import hashlib
import os
from typing import Tuple

import numpy as np

from cspx.data.loader import DataSplit
from cspx.errors import CspxError


def held_out_count(n: int, fraction: float) -> int:
    """Images of a class of `n` held out: round(fraction x n), halves rounded up."""
    return int(np.floor(fraction * n + 0.5))


def min_class_size(fraction: float) -> int:
    """The fewest images a class needs for at least one on each side of the split."""
    n = 2
    while not 1 <= held_out_count(n, fraction) <= n - 1:
        n += 1
    return n


def _key(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{name}".encode("utf-8"), digest_size=8).digest()


def names_of(split: DataSplit) -> list:
    """Every sample's name (a shard split reads them from its shards: 1.28M small reads for
    ImageNet's train split, only when a split is asked for)."""
    paths = getattr(split, "paths", None)
    return paths() if callable(paths) else [split.name(i) for i in range(len(split))]


def holdout(split: DataSplit, fraction: float, seed: int,
            key: str = "data.val_split") -> Tuple[DataSplit, DataSplit]:
    """(training part, held-out part) of `split`, each in the split's own order. A class too
    small to give each side one image is a CspxError naming the class and `key`."""
    names = names_of(split)
    labels = np.asarray(split.labels)
    held = np.zeros(len(names), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if not len(members):
            continue
        n = len(members)
        k = held_out_count(n, fraction)
        if not 1 <= k <= n - 1:
            wnid = split.classes[int(labels[members[0]])]
            where = os.path.join(split.root, getattr(split, "split", ""))
            raise CspxError(f"{key}: class {wnid!r} has {n} image{'s' * (n != 1)} in "
                            f"{where.rstrip(os.sep)}, too few to hold out {fraction:g} of them "
                            f"({k} for validation, {n - k} for training); at this fraction a "
                            f"class needs at least {min_class_size(fraction)} images")
        ranked = sorted(members.tolist(), key=lambda i: _key(seed, names[i]))
        held[ranked[:k]] = True
    return split.select(np.flatnonzero(~held)), split.select(np.flatnonzero(held))
