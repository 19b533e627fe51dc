"""The loader interface, used at every training step and evaluation: what the trainer and the
evaluator may ask of a loader, whichever kind (torch, DALI; folder or shards) it is.

The trainer and `eval_metrics.evaluate` use only these members, so a new loader kind plugs in
without touching them. What the loader kinds share lives here too: `CountedPosition`, the
position bookkeeping of every training loader (its whole resumable position is the number of
micro-batches handed out); `EpochBatchSampler`, cspx's own training order; and
`contiguous_share`, the one rule for splitting evaluation between ranks.

`DataSplit` is the other side: what every loader reads of a dataset split, whichever format
(data.format) stores it: a folder (`index.FolderSplit`) or shards (`shard_reader.ShardSplit`).
A split must fit its batches (`check_fits`); that is checked once, where a run is set up
(cspx.resolve for training, eval_checkpoint for validate.py), not by every loader.
"""
from __future__ import annotations

import hashlib
from typing import (
    Any,
    ClassVar,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

import numpy as np
import torch

from cspx.data.transforms import sample_seed
from cspx.errors import CspxError

Batch = Tuple[torch.Tensor, torch.Tensor]                 # images (N,3,H,W), labels (N,) int64
EvalBatch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # + indices (N,) into the split


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

    def select(self, indices: np.ndarray) -> "DataSplit": ...  # these samples (a held-out split)


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

    @property
    def num_samples(self) -> int: ...  # images in this rank's share

    def __iter__(self) -> Iterator[EvalBatch]: ...

    def __len__(self) -> int: ...      # batches per pass

    def close(self) -> None: ...


class CountedPosition:
    """Position bookkeeping of a training loader: `consumed` micro-batches handed out.
    Subclasses set `kind` and `batches_per_epoch`, keep their live iterator in `_it` (None
    before the first batch and after close()), and extend `_load_position` for state beyond
    the count."""

    kind = ""
    consumed = 0
    batches_per_epoch = 1
    _it: Optional[Any] = None

    @property
    def epoch(self) -> float:
        return self.consumed / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: before the first batch (or after close()), from a loader of
        this kind."""
        if self._it is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        if state.get("kind") != self.kind:
            raise CspxError(f"checkpoint: the loader state is for a {state.get('kind')!r} "
                            f"loader, this run uses {self.kind!r} (data.loader)")
        self._load_position(state)

    def _load_position(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


class EpochBatchSampler:
    """cspx's training order, for one rank: an infinite batch sampler of (epoch, index) keys,
    starting at global micro-batch `start`.

    Epoch e is a permutation of the split drawn from (seed, e). Optimizer step s over all ranks
    consumes consecutive global micro-batches of `micro_batch * world` samples; rank r takes
    slice r of each. So one rank with batch 8 and two ranks with batch 4 see the same samples
    per step, the ranks are disjoint within an epoch, and the whole position is one integer.
    The last `n mod (micro_batch * world)` samples of each permutation are left out of that
    epoch (different ones each epoch). The torch loader samples with it, and the DALI loader
    on shards (dali_sources.ShardTrainSource)."""

    def __init__(self, *, n: int, micro_batch: int, rank: int, world: int, seed: int,
                 start: int = 0):
        self.n, self.mb, self.rank, self.world, self.seed = n, micro_batch, rank, world, seed
        self.batches_per_epoch = n // (micro_batch * world)  # >= 1: check_fits at setup
        self.start = start
        self._perm: Tuple[int, List[int]] = (-1, [])  # the last epoch's permutation

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        return torch.randperm(self.n, generator=g)

    def batch(self, k: int) -> Tuple[int, List[int]]:
        """(epoch, this rank's indices) of global micro-batch k."""
        e, b = divmod(k, self.batches_per_epoch)
        if self._perm[0] != e:
            self._perm = (e, self.permutation(e).tolist())
        lo = (b * self.world + self.rank) * self.mb
        return e, self._perm[1][lo:lo + self.mb]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        k = self.start
        while True:
            epoch, indices = self.batch(k)
            yield [(epoch, i) for i in indices]
            k += 1


def contiguous_share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s share of a split of n samples in evaluation: the contiguous slice
    [floor(rank n / world), floor((rank + 1) n / world)). Shares differ by at most one sample,
    none is padded, and every sample is in exactly one share.

    Both loaders split evaluation this one way, so a rank evaluates the same images whichever
    loader it runs. Contiguous, not strided: it is how DALI's readers shard a file list
    (shard_id / num_shards), so the DALI loader needs no file list of its own per rank, and a
    rank reads neighbouring samples (on shards: consecutive samples of a few tar files). DALI's
    folder reader for training shards the same way."""
    return range(rank * n // world, (rank + 1) * n // world)


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
