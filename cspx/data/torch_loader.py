"""The torch data path, at every training step and evaluation: PIL decoding in DataLoader
workers, sharded by rank, resumable. It reads any `loader.DataSplit`: a folder's files, or a
sharded dataset's samples by offset (shard_reader.ShardSplit); only `read(i)` differs.

Order. cspx's own (loader.EpochBatchSampler): epoch e is a permutation of the split drawn from
(seed, e), and rank r takes slice r of each global micro-batch; the whole position is one
integer, the micro-batches consumed. Evaluation: rank r evaluates loader.contiguous_share.

Bad files. A folder split already excludes files failing the quick scan (make_shards.py leaves
out images that do not decode); a sample that still fails to read or decode is named in a
warning (its original path), counted, and replaced by the next sample of the split, with the
original sample's random seed, so a run never crashes and stays deterministic.

Generators. Every DataLoader gets a generator of its own: a DataLoader draws its workers' base
seed from its generator each time an iterator is made, and with the default (torch's global
generator) a resumed run, which makes its iterators at other steps, would leave the global
generator in another state than an uninterrupted run. Augmentations never use the workers'
seeds (each sample is seeded from (seed, epoch, index)), so this changes no pixel.
"""
from __future__ import annotations

import gc
import logging
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from cspx import hostmem
from cspx.config import AugConfig
from cspx.data.loader import CountedPosition, DataSplit, EpochBatchSampler, contiguous_share
from cspx.data.transforms import (
    TrainTransform,
    decode_rgb,
    eval_transform,
    mean_std,
    normalize_,
    sample_seed,
    seeded,
)
from cspx.errors import CspxError
from cspx.placement import memory_format

log = logging.getLogger("cspx")
MAX_REPLACEMENTS = 16


class TrainDataset(Dataset):
    """Item key is (epoch, index): the pair seeds the sample's augmentation."""

    def __init__(self, split: DataSplit, aug: AugConfig, seed: int):
        self.split, self.seed, self.transform = split, seed, TrainTransform(aug)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, i = key
        n = len(self.split)
        for attempt in range(MAX_REPLACEMENTS):
            j = (i + attempt) % n
            try:
                img = decode_rgb(self.split.read(j))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
                log.warning(f"{self.split.location(j)}: cannot decode ({type(e).__name__}: {e}); "
                            f"replaced by the next file")
                continue
            with seeded(sample_seed(self.seed, epoch, i)):
                x = self.transform(img)
            return x, int(self.split.labels[j]), attempt
        fix = ("run scripts/make_shards.py --verify on data.root" if self.split.format == "shards"
               else "run scripts/check_dataset.py and set data.exclude to the list it writes")
        raise CspxError(f"{MAX_REPLACEMENTS} consecutive files failed to decode near "
                        f"{self.split.location(i)}; {fix}")


class EvalDataset(Dataset):
    """Returns (uint8 image, label, index); label -1 marks an image that failed to decode, which
    evaluation leaves out (and counts) rather than replacing, so nothing is counted twice."""

    def __init__(self, split: DataSplit, img_size: int, crop_pct: float, interpolation: str):
        self.split = split
        self.transform = eval_transform(img_size, crop_pct, interpolation)
        self.blank = torch.zeros(3, img_size, img_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            return self.transform(decode_rgb(self.split.read(i))), int(self.split.labels[i]), i
        except Exception as e:
            log.warning(f"{self.split.location(i)}: cannot decode ({type(e).__name__}: {e}); "
                        f"skipped")
            return self.blank, -1, i


def worker_init(_: int) -> None:
    """Every DataLoader worker's start (worker_init_fn): one thread, glibc's malloc defaults."""
    torch.set_num_threads(1)  # decoding parallelism comes from the workers themselves
    hostmem.worker_defaults()  # glibc's malloc as a worker needs it, not as the trainer set it


def collate(batch):
    """The loaders' collate_fn: (images (N,3,H,W) uint8, labels int64 (N,), int64 (N,): the files
    replaced per sample in training, the sample's index in evaluation)."""
    xs, ys, extra = zip(*batch)
    return (torch.stack(xs), torch.tensor(ys, dtype=torch.int64),
            torch.tensor(extra, dtype=torch.int64))


def _loader(dataset, workers: int, pin: bool, **kw) -> DataLoader:
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=worker_init)
    # its own generator, never torch's global one (module docstring); seeded only to be fixed
    return DataLoader(dataset, num_workers=workers, pin_memory=pin, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0), **kw)


def _start(dl: DataLoader):
    """iter(dl), with the parent's objects frozen while the workers fork.

    A forked worker shares the parent's memory pages until either process writes one. Python's
    cyclic garbage collector writes into every object it examines, so without this each
    worker's collections would copy, page by page, the parent's whole heap (model, index,
    modules) over the first epochs: memory that grows for no use. Frozen objects are skipped
    by the workers' collections; the parent unfreezes them at once, so nothing stays
    uncollectable there."""
    if dl.num_workers == 0:
        return iter(dl)
    gc.collect()
    gc.freeze()
    try:
        return iter(dl)
    finally:
        gc.unfreeze()


class DeviceFeeder:
    """Moves uint8 batches to the device and normalizes them there (in float32, then `dtype`),
    into the layout the model wants. On CUDA the copy runs on a side stream one batch ahead,
    overlapping compute."""

    def __init__(self, device: torch.device, channels_last: bool,
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = device, dtype
        self.memory_format = memory_format(channels_last)
        self.mean, self.std = mean_std(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _convert(self, x: torch.Tensor, y: torch.Tensor,
                 non_blocking: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        x = normalize_(x.to(self.device, non_blocking=non_blocking), self.mean, self.std)
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=non_blocking)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            return self._convert(x, y, False)
        with torch.cuda.stream(self.stream):
            return self._convert(x, y, True)

    def sync(self, x: torch.Tensor, y: torch.Tensor):
        """Make the current stream wait for a batch made by __call__ before using it."""
        if self.stream is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(self.stream)
            x.record_stream(cur)  # the allocator must not reuse it while compute reads it
            y.record_stream(cur)
        return x, y


class TorchTrainLoader(CountedPosition):
    """Infinite iterator of (images float NCHW on device, labels int64 on device). Its position
    is global (micro-batches of the whole run): any world size continues it."""

    kind = "torch"

    def __init__(self, *, split: DataSplit, aug: AugConfig, seed: int, micro_batch: int,
                 rank: int, world: int, workers: int, device: torch.device, channels_last: bool,
                 dtype: torch.dtype = torch.float32):
        self.dataset = TrainDataset(split, aug, seed)
        self.sampler = EpochBatchSampler(n=len(split), micro_batch=micro_batch, rank=rank,
                                         world=world, seed=seed)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.workers, self.device = workers, device
        self.feeder = DeviceFeeder(device, channels_last, dtype)
        self.consumed = 0          # micro-batches handed to the training loop
        self.bad_files = 0         # decode failures replaced so far (this process)
        self._it: Optional[Iterator] = None
        self._next: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # fetched one ahead

    def _fetch(self, it: Iterator) -> Tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y, replaced = next(it)
        except CspxError as e:  # from a worker: the message carries the worker's traceback
            raise CspxError(str(e).strip().splitlines()[-1].split("CspxError: ", 1)[-1]) from None
        self.bad_files += int(replaced.sum())  # a CPU tensor: no device sync
        return self.feeder(x, y)

    def __iter__(self):
        return self

    def __next__(self):
        it = self._it
        if it is None:
            self.sampler.start = self.consumed
            dl = _loader(self.dataset, self.workers, self.device.type == "cuda",
                         batch_sampler=self.sampler)
            it = self._it = _start(dl)
            self._next = self._fetch(it)
        batch, self._next = self._next, self._fetch(it)
        assert batch is not None  # fetched above on the first call, else by the last one
        self.consumed += 1
        return self.feeder.sync(*batch)

    def close(self) -> None:
        self._it = self._next = None


class TorchEvalLoader:
    """One pass over this rank's share (loader.contiguous_share): no padding, no drops.
    Yields (images, labels, indices); labels are -1 where decoding failed."""

    kind = "torch"

    def __init__(self, *, split: DataSplit, img_size: int, crop_pct: float, interpolation: str,
                 batch_size: int, rank: int, world: int, workers: int, device: torch.device,
                 channels_last: bool):
        self.dataset = EvalDataset(split, img_size, crop_pct, interpolation)
        self.indices = list(contiguous_share(len(split), rank, world))
        self.batch_size, self.workers, self.device = batch_size, workers, device
        self.feeder = DeviceFeeder(device, channels_last)
        self._dl: Optional[DataLoader] = None  # built once: persistent workers serve every pass

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __iter__(self):
        if self._dl is None:
            batches = [self.indices[i:i + self.batch_size]
                       for i in range(0, len(self.indices), self.batch_size)]
            self._dl = _loader(self.dataset, self.workers, self.device.type == "cuda",
                               batch_sampler=batches)
            batches_it = _start(self._dl)  # forks the persistent workers, once
        else:
            batches_it = iter(self._dl)  # the same workers: nothing to freeze, no collection
        for x, y, idx in batches_it:
            x, y = self.feeder.sync(*self.feeder(x, y))
            yield x, y, idx

    def close(self) -> None:
        self._dl = None  # its persistent workers exit with it
