"""The loader interface, used at every training step and evaluation: what the trainer and the
evaluator may ask of a loader, whichever kind (torch, DALI; folder or shards) it is.

The trainer and `eval_metrics.evaluate` use only these members, so a new loader kind plugs in
without touching them. `CountedPosition` is the position bookkeeping every training loader
shares: its whole resumable position is the number of micro-batches handed out.

`DataSplit` is the other side: what every loader reads of a dataset split, whichever format
(data.format) stores it: a folder (`index.DatasetIndex`) or shards (`shard_reader.ShardSplit`).
"""
from __future__ import annotations

import hashlib
from typing import (ClassVar, Dict, Iterable, Iterator, List, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np
import torch

from cspx.errors import CspxError

Batch = Tuple[torch.Tensor, torch.Tensor]                 # images (N,3,H,W), labels (N,) int64
EvalBatch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # + indices (N,) into the index


@runtime_checkable
class DataSplit(Protocol):
    """One split of a dataset: sample i is an image file's bytes and a label. Indices run over
    the samples kept (excluded files or shards are not in them) in the split's fixed order."""

    format: ClassVar[str]     # "folder" or "shards": data.format, resolved
    root: str
    classes: List[str]        # classes[k] is the wnid of label k
    labels: np.ndarray        # int64, shape (len,)
    excluded: Dict[str, str]  # what was left out (a file or a shard) -> why

    def __len__(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def read(self, i: int) -> bytes: ...     # the image file's bytes, untouched

    def name(self, i: int) -> str: ...       # its path relative to the split, 'wnid/file'

    def location(self, i: int) -> str: ...   # where to find it, for messages

    def fingerprint(self) -> str: ...        # samples and labels, for resume checks

    def subset(self, n: int) -> "DataSplit": ...  # the first n samples (--limit)


@runtime_checkable
class TrainLoader(Protocol):
    """An infinite iterator of micro-batches on the run's device, in the model's layout."""

    kind: str                 # "torch", "dali", ...: the checkpoint records which
    batches_per_epoch: int    # micro-batches per epoch on this rank
    bad_files: int            # files that failed to decode and were replaced (this process)

    @property
    def epoch(self) -> float: ...     # epochs done, fractional

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...  # plain values: the exact position, for resume

    def load_state_dict(self, state: dict) -> None: ...  # before the first batch

    def close(self) -> None: ...       # free workers and buffers; the position is kept


@runtime_checkable
class EvalLoader(Protocol):
    """One pass over this rank's share of the evaluation set per iteration; every image of the
    set is in exactly one rank's share. Labels are -1 where an image failed to decode."""

    num_samples: int          # images in this rank's share

    def __iter__(self) -> Iterator[EvalBatch]: ...

    def __len__(self) -> int: ...      # batches per pass

    def close(self) -> None: ...


class CountedPosition:
    """Position bookkeeping of a training loader: `consumed` micro-batches handed out.
    Subclasses set `kind` and `batches_per_epoch`."""

    kind = ""
    consumed = 0
    batches_per_epoch = 1

    @property
    def epoch(self) -> float:
        return self.consumed / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise CspxError(f"checkpoint: the loader state is for a {state.get('kind')!r} "
                            f"loader, this run uses {self.kind!r} (data.loader)")
        self.consumed = int(state["consumed"])


def listing_hash(files: Sequence[str], labels: Iterable[int], salt: str = "") -> str:
    """16 hex digits identifying a list of (relative path, label) pairs (and `salt`)."""
    h = hashlib.sha256(salt.encode())
    for rel, lab in zip(files, labels):
        h.update(f"{rel}\t{lab}\n".encode())
    return h.hexdigest()[:16]


def check_fits(split: str, images: int, per_batch: int, world: int, partial: bool) -> None:
    """A split too small for one batch is bad input, found before anything runs.

    Training drops the incomplete last batch of each epoch, so every rank needs one full
    micro-batch: images >= per_batch x world. Evaluation keeps partial batches, so every rank
    needs one image: images >= world."""
    need = world if partial else per_batch * world
    if images >= need:
        return
    what = (f"{world} ranks need one image each" if partial else
            f"one batch needs {per_batch} images per rank x {world} rank(s) = {need}")
    fix = ("run on fewer ranks" if partial else
           "lower train.batch_size (or raise train.accum_steps), or add images")
    raise CspxError(f"data.root: the {split} set has {images} image{'s' * (images != 1)}, but "
                    f"{what}; {fix}")
