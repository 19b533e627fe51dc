"""What feeds the DALI graphs on a sharded dataset, at every training step and evaluation: cspx's
own reads of a `shard_reader.ShardSplit`, handed to `fn.external_source` a batch at a time.

This is the only part of the DALI path that knows the data format: dali_pipelines builds one
graph per task whose input is either `fn.readers.file` (a folder's file list) or one of these
callables; everything after the encoded bytes is the same operators.

Training (`ShardTrainSource`). DALI calls the source with BatchInfo; `info.iteration` counts the
batches since the pipeline started, and a pipeline restored from a DALI checkpoint resumes that
count at the batches handed out (not at what it had prefetched). Batch k is global micro-batch k
of loader.EpochBatchSampler: epoch e is one permutation of the whole split drawn from
(seed, e), so the shuffle is per sample across shards, the ranks are disjoint within an epoch,
and the torch and DALI loaders see the same images at every step. The source never ends.

Evaluation (`ShardEvalSource`). Rank r takes the contiguous slice [r n / w, (r + 1) n / w) of the
split (loader.contiguous_share, as DALI's readers shard a file list), one batch per call, the
last one partial, then raises StopIteration: the end of the pass. Every image is counted once,
on any number of ranks, also with `--limit` or excluded shards, since the indices are the
split's own.

Both yield (encoded bytes as uint8 (size,), int32 (1,)): the label (training) or the index in the
split (evaluation, gathered into labels on the device as for folders).
"""
from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

import numpy as np

from cspx.data import scan
from cspx.data.loader import EpochBatchSampler
from cspx.data.shard_reader import ShardSplit
from cspx.errors import CspxError

Batch = Tuple[List[np.ndarray], List[np.ndarray]]
RECENT = 8  # batches remembered to name an image DALI failed to decode (prefetch depth is 2)


class _Source:
    """Reads samples of a split into a DALI batch, remembering the last few batches' indices."""

    def __init__(self, split: ShardSplit):
        self.split = split
        self.recent: Deque[List[int]] = deque(maxlen=RECENT)

    def _batch(self, indices: Sequence[int], second: Sequence[int]) -> Batch:
        self.recent.append(list(indices))
        try:
            data = [np.frombuffer(self.split.read(i), np.uint8) for i in indices]
        except OSError as e:  # the shard changed after the start-up check
            raise CspxError(f"{self.split.root}: reading a {self.split.split} sample failed "
                            f"({e}); rerun scripts/make_shards.py --verify") from None
        return data, [np.array([v], np.int32) for v in second]

    def undecodable(self) -> Optional[str]:
        """The location of the first recently read sample that PIL cannot decode either, for the
        message of a DALI decoding error (DALI's own names no file for an external source)."""
        for batch in self.recent:
            for i in batch:
                reason = scan.check_bytes(self.split.read(i))
                if reason is not None:
                    return f"{self.split.location(i)}: {reason}"
        return None


class ShardTrainSource(_Source):
    """Batch callable: this rank's share of global micro-batch `info.iteration`, with labels."""

    def __init__(self, split: ShardSplit, sampler: EpochBatchSampler):
        super().__init__(split)
        self.sampler = sampler

    def __call__(self, info) -> Batch:
        _, indices = self.sampler.batch(info.iteration)
        return self._batch(indices, self.split.labels[indices].tolist())


class ShardEvalSource(_Source):
    """Batch callable: batch `info.iteration` of this rank's slice [lo, hi), with indices."""

    def __init__(self, split: ShardSplit, lo: int, hi: int, batch_size: int):
        super().__init__(split)
        self.lo, self.hi, self.batch_size = lo, hi, batch_size

    def __call__(self, info) -> Batch:
        start = self.lo + info.iteration * self.batch_size
        if start >= self.hi:
            raise StopIteration  # the end of the pass; DALI restarts at iteration 0 on reset
        indices = list(range(start, min(start + self.batch_size, self.hi)))
        return self._batch(indices, indices)
