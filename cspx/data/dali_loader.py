"""The DALI data path, at every training step and evaluation: cspx.data.loader's interface,
decoding with DALI.

On a CUDA device JPEGs are decoded by nvJPEG (`mixed`, with the A100/H100 hardware decoder taking
`hw_decoder_load` of them) and augmented on the GPU; on a CPU device DALI runs CPU-only
(`device_id=None`). An explicit `dali` request on a CUDA device without CUDA fails with a message;
it never falls back silently.

Order, folders. Every rank writes the same file list. Each epoch DALI permutes the whole list
with one seed shared by all ranks (`shuffle_after_epoch`), and rank r reads the r-th contiguous
slice of that permutation (DALI shards), so ranks are disjoint within an epoch. Shards differ in
size by at most one image. An epoch on a rank is `shard_size // micro_batch` micro-batches: the
reader pads the shard to whole batches and the iterator drops the padded last batch
(LastBatchPolicy.DROP), so the next epoch starts on a batch boundary and the dropped images
differ from epoch to epoch. In the rare case that one rank's larger shard fills one more batch,
that rank's epochs are one batch longer; ranks still step together, since the iterator is
infinite.

Order, shards. cspx reads the samples itself and hands them to fn.external_source in the order
of the torch loader (loader.EpochBatchSampler): one permutation of the whole split per
epoch, rank r taking slice r of each global micro-batch (dali_sources). Only the graph's input
differs from the folder path; its operators, seeds and checkpoint are the same.

Resume. Pipelines are built with `enable_checkpointing=True`. DALI's checkpoint describes the
position after the last batch handed out, not after the batches the pipeline has prefetched, and
it holds the reader's shuffle state and every random operator's generator state. `state_dict()`
stores it with the micro-batch count; a new loader given it via `load_state_dict` rebuilds
the pipeline from it and continues with the exact next batch, augmentations included, also
across epoch boundaries; from shards it also restarts the source at the batch handed out. The
shard and pipeline settings must match (checked). On another world size (a forced resume)
DALI's order cannot follow: the loader says so and starts afresh.

Output memory. With DALI's default executor the iterator hands out zero-copy views of DALI's
buffers, freed back to DALI only after torch drops them and DALI's deleter thread has waited for
the device (cudaDeviceSynchronize from another thread). On a GPU the loaders therefore copy each
batch into torch-owned memory on torch's current stream and drop DALI's view at once: the
batch's lifetime is then torch's alone (a backward pass still queued, CUDA graphs, a batch kept
for the image grid), and no DALI buffer is freed while torch captures a CUDA graph. The copy
reads and writes one batch: 38.5 MB at batch 128, 224 px, float16, about 30 us at H100 memory
bandwidth (an estimate; `scripts/benchmark.py loader --loaders dali-copy,dali-zerocopy`
measures both ways on a GPU). On the CPU there are no streams, and the views are used as they
are. `DaliTrainLoader(copy_out=...)` overrides the choice (the benchmark's zero-copy row).

Bad files. DALI cannot skip a file at run time, so files failing the folder index's quick scan
are never listed (`FolderSplit.excluded`), and `bad_files` stays 0: unlike the torch path,
nothing is replaced while running. A file that passes the scan but fails to decode stops the
run with a message naming scripts/check_dataset.py (its exclusion list goes to data.exclude);
from shards, whose images make_shards.py decoded once already, the message names the image
(its original path and shard) and `make_shards.py --verify`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, NoReturn, Optional, Tuple

import torch

from cspx.config import AugConfig
from cspx.data.dali_sources import ShardEvalSource, ShardTrainSource
from cspx.data.index import FolderSplit, cache_dir
from cspx.data.loader import (
    CountedPosition,
    DataSplit,
    EpochBatchSampler,
    contiguous_share,
    listing_hash,
)
from cspx.data.shard_reader import ShardSplit
from cspx.data.transforms import eval_resize_size, sample_seed
from cspx.errors import CspxError

if TYPE_CHECKING:  # DALI is optional at run time: imported where a loader is built
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

log = logging.getLogger("cspx")
DTYPES = {torch.float32: "float32", torch.float16: "float16"}
# Version of dali_pipelines.train_pipeline's graph, part of a loader's checkpoint signature: DALI
# state saved by a graph with other operators does not resume this one. Raise it on such changes.
GRAPH_VERSION = 2


def dali_available(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(True, '') if DALI imports and can run on `device`, else (False, why not)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing CUDA libraries, ...)
        return False, f"nvidia.dali does not import ({type(e).__name__}: {e})"
    if device is None or device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"DALI runs on CPU or CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch"
    try:
        from nvidia.dali import backend
        # in DALI's compiled backend; its backend.pyi leaves it out
        if backend.GetCUDADeviceCount() < 1:  # type: ignore[attr-defined]
            return False, "DALI sees no CUDA device"
    except Exception as e:
        return False, f"DALI cannot use CUDA ({type(e).__name__}: {e})"
    return True, ""


def _device_id(device: torch.device) -> Optional[int]:
    """DALI's device_id: None runs CPU-only; a CUDA device must really be usable."""
    if device.type == "cpu":
        return None
    ok, reason = dali_available(device)
    if not ok:
        raise CspxError(f"DALI loader on {device}: {reason}; use data.loader=torch or a CPU device")
    return device.index if device.index is not None else torch.cuda.current_device()


def _file_list(directory: str, name: str, split: FolderSplit, label_is_position: bool) -> str:
    """Write (or reuse) the file list; the name carries a hash of its contents (relative paths and
    labels), so concurrent ranks and later runs agree on it without locking."""
    digest = listing_hash(split.files, split.labels.tolist(), str(label_is_position))
    path = os.path.join(directory, f"{name}-{digest}.txt")
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(path):
        split.write_file_list(path, label_is_position=label_is_position)
    return path


def _folder_reader(split: DataSplit, directory: Optional[str], name: str, rank: int, world: int,
                   shuffle_seed: int, label_is_position: bool) -> Dict[str, Any]:
    """fn.readers.file's settings for a folder: rank r reads DALI's shard r of the file list,
    the slice loader.contiguous_share."""
    directory = directory or os.path.join(cache_dir(), "dali")
    assert isinstance(split, FolderSplit)
    files = _file_list(directory, name, split, label_is_position)
    return dict(file_root=split.root, file_list=files, shard_id=rank, num_shards=world,
                shuffle_seed=shuffle_seed)


def _reraise(e: RuntimeError, source=None) -> NoReturn:
    """Raise a decoder failure as a CspxError that says what to do; other errors unchanged.
    `source`: the shard source that fed the graph, which finds the image (DALI cannot name it)."""
    msg = str(e)
    if "fn.decoders" not in msg and "peek_image_shape" not in msg:
        raise e
    if source is not None:
        raise CspxError(f"DALI failed to decode {source.undecodable() or 'an image'}. DALI "
                        f"cannot skip an image: run scripts/make_shards.py --verify on data.root "
                        f"and rewrite the shard, or use data.loader=torch, which replaces "
                        f"undecodable images") from e
    lines = [ln.strip() for ln in msg.splitlines()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    cause = next((ln for ln in after if ln), "unknown error")  # e.g. 'Failed to decode ... : path'
    raise CspxError(f"DALI failed to decode an image ({cause}). DALI cannot skip a file: run "
                    f"scripts/check_dataset.py and set data.exclude to the list it writes, or "
                    f"use data.loader=torch, which replaces undecodable files") from e


def _iterator(pipe: Pipeline, names, source, policy) -> DALIGenericIterator:
    """DALI's torch iterator: over a file reader's epochs (`policy` for its last batch), or over
    an external source, which decides alone where a pass ends (StopIteration) or never ends."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    kw = {} if source is not None else dict(reader_name="Reader", last_batch_policy=policy)
    return DALIGenericIterator([pipe], names, auto_reset=True, **kw)


def nchw_images(x: torch.Tensor, channels_last: bool, own: bool) -> torch.Tensor:
    """DALI's output as the model's NCHW tensor. DALI gives NHWC when channels_last: the NCHW
    view of it is channels_last, with no copy. own: copy into torch-owned memory (module doc)."""
    x = x.permute(0, 3, 1, 2) if channels_last else x
    return x.clone(memory_format=torch.preserve_format) if own else x


class DaliTrainLoader(CountedPosition):
    """Infinite iterator of (images (N,3,H,W) `dtype` on device, labels int64 on device)."""

    kind = "dali"

    def __init__(self, *, split: DataSplit, aug: AugConfig, seed: int, micro_batch: int,
                 rank: int, world: int, workers: int, device: torch.device, channels_last: bool,
                 dtype: torch.dtype = torch.float32, hw_decoder_load: float = 0.65,
                 file_list_dir: Optional[str] = None, copy_out: Optional[bool] = None):
        if dtype not in DTYPES:
            raise ValueError(f"DALI loader produces float32 or float16, not {dtype}")
        self.device, self.device_id = device, _device_id(device)
        # hand out torch-owned copies (default: on a GPU) or DALI's own buffers (module doc)
        self.copy_out = self.device_id is not None if copy_out is None else copy_out
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.workers, self.channels_last = max(1, workers), channels_last
        if isinstance(split, ShardSplit):  # cspx's global permutation (dali_sources module doc)
            sampler = EpochBatchSampler(n=len(split), micro_batch=micro_batch, rank=rank,
                                        world=world, seed=seed)
            self.batches_per_epoch = sampler.batches_per_epoch
            self.source: Optional[ShardTrainSource] = ShardTrainSource(split, sampler)
            self.reader: Dict[str, Any] = {"source": self.source}
            order = {"order": "cspx", "rank": rank, "world": world, "files": split.fingerprint()}
        else:
            shard = contiguous_share(len(split), rank, world)  # DALI's shard of the file list
            self.batches_per_epoch = len(shard) // micro_batch
            self.source = None
            self.reader = _folder_reader(split, file_list_dir, "train", rank, world,
                                         sample_seed(seed, -1, -1) & 0x7FFFFFFF,  # on every rank
                                         label_is_position=False)
            order = {k: v for k, v in self.reader.items() if k not in ("file_root", "file_list")}
            order["files"] = os.path.basename(self.reader["file_list"])
        self.params = dict(
            mixed=self.device_id is not None,
            hw_decoder_load=hw_decoder_load, img_size=aug.img_size, scale=list(aug.scale),
            ratio=list(aug.ratio), interpolation=aug.interpolation, hflip=aug.hflip,
            rotate=aug.rotate, hue=aug.hue, saturation=aug.saturation, exposure=aug.exposure,
            ra_ops=aug.randaugment_ops, ra_magnitude=aug.randaugment_magnitude,
            ra_interpolation=aug.randaugment_interpolation,
            dtype_name=DTYPES[dtype], channels_last=channels_last)
        if aug.policy in ("trivialaugment", "autoaugment"):
            # only then: graphs with RandAugment or no policy keep the signature (below) that
            # checkpoints of cspx before aug.policy recorded, and so resume from them
            self.params["policy"] = aug.policy
        self.aug_seed = sample_seed(seed, -2, rank) & 0x7FFFFFFF  # augmentation differs by rank
        # what a checkpoint depends on: the samples (a folder's file list's name hashes them, a
        # shard split's fingerprint), the order, the graph and the seeds; not where the data
        # lives, nor throughput knobs
        graph = {k: v for k, v in self.params.items() if k != "hw_decoder_load"}
        self.signature = hashlib.sha256(json.dumps(
            {**graph, **order, "batch": micro_batch, "seed": self.aug_seed,
             "graph_version": GRAPH_VERSION}, sort_keys=True).encode()).hexdigest()
        self.consumed = 0          # micro-batches handed to the training loop
        self.bad_files = 0         # always 0: DALI replaces nothing at run time (module doc)
        self._checkpoint: Optional[bytes] = None
        self._pipe: Optional[Pipeline] = None
        self._it: Optional[DALIGenericIterator] = None

    def state_dict(self) -> dict:
        """Plain types only. The DALI checkpoint (serialized protobuf bytes) is kept as base64
        text, which every torch.load(weights_only=True) since torch 2.4 reads back."""
        ckpt = self._it.checkpoints()[0] if self._it is not None else self._checkpoint
        return {**super().state_dict(), "world": self.world, "rank": self.rank,
                "signature": self.signature,
                "checkpoint": base64.b64encode(ckpt or b"").decode("ascii")}

    def _load_position(self, state: dict) -> None:
        """After CountedPosition's checks: the DALI checkpoint, where it fits this pipeline."""
        if (state.get("world"), state.get("rank")) != (self.world, self.rank):
            if self.rank == 0:
                log.warning(f"DALI loader: the checkpoint's data order is for {state.get('world')} "
                            f"rank(s), this run has {self.world}; DALI's order cannot move to "
                            f"another world size, so it starts afresh (a new permutation, "
                            f"epoch count from 0)")
            return
        if state.get("signature") != self.signature:
            raise CspxError("checkpoint: its DALI loader state comes from another dataset, batch "
                            "size, seed, augmentation or cspx version of the DALI graph; it "
                            "cannot resume this pipeline exactly")
        super()._load_position(state)
        self._checkpoint = base64.b64decode(state["checkpoint"]) or None

    def _build(self) -> DALIGenericIterator:
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        from cspx.data.dali_pipelines import train_pipeline
        try:
            self._pipe = train_pipeline(self.reader, **self.params, batch_size=self.micro_batch,
                                        num_threads=self.workers, device_id=self.device_id,
                                        seed=self.aug_seed, enable_checkpointing=True,
                                        checkpoint=self._checkpoint)
            self._it = it = _iterator(self._pipe, ["images", "labels"], self.source,
                                      LastBatchPolicy.DROP)
        except RuntimeError as e:
            _reraise(e, self.source)
        return it

    def __iter__(self):
        return self

    def __next__(self):
        it = self._it if self._it is not None else self._build()
        try:
            try:
                out = next(it)[0]
            except StopIteration:  # end of a file reader's epoch (auto_reset has reset it)
                out = next(it)[0]
        except RuntimeError as e:
            _reraise(e, self.source)
        self.consumed += 1
        x = nchw_images(out["images"], self.channels_last, own=self.copy_out)
        y = out["labels"].view(-1).to(self.device, torch.int64, non_blocking=True)
        return x, y

    def close(self) -> None:
        """Stop DALI's threads and free its buffers (the pipeline goes with the iterator). The
        position is kept: state_dict() stays right, and a later batch continues from it."""
        if self._it is not None:
            try:
                self._checkpoint = self._it.checkpoints()[0]
            except RuntimeError:  # the pipeline died with an error: nothing to keep
                pass
        self._it = self._pipe = None


class DaliEvalLoader:
    """One pass over this rank's share (loader.contiguous_share: the contiguous slice
    [r n / w, (r + 1) n / w) of the split) per iteration, every image exactly once. From a
    folder's file list the reader pads the shard to whole batches and the iterator cuts the
    padding off the last batch (LastBatchPolicy.PARTIAL); from shards the source hands out the
    slice and ends the pass itself. Yields (images, labels, indices int64 into the split), all
    three on the device: on a GPU the positions never visit the host. The pipeline is built
    once and serves every pass."""

    kind = "dali"

    def __init__(self, *, split: DataSplit, img_size: int, crop_pct: float, interpolation: str,
                 batch_size: int, rank: int, world: int, workers: int, device: torch.device,
                 channels_last: bool, file_list_dir: Optional[str] = None):
        self.device, self.device_id = device, _device_id(device)
        self.batch_size, self.workers = batch_size, max(1, workers)
        self.channels_last = channels_last
        share = contiguous_share(len(split), rank, world)
        self._num = len(share)
        if isinstance(split, ShardSplit):
            self.source: Optional[ShardEvalSource] = ShardEvalSource(split, share.start,
                                                                     share.stop, batch_size)
            self.reader: Dict[str, Any] = {"source": self.source}
        else:  # DALI's reader takes the same slice of the file list itself
            self.source = None
            self.reader = _folder_reader(split, file_list_dir, "val", rank, world, 0,
                                         label_is_position=True)
        self.params = dict(
            mixed=self.device_id is not None, img_size=img_size,
            resize_size=eval_resize_size(img_size, crop_pct), interpolation=interpolation,
            channels_last=channels_last)
        # the reader's label is the position in the split: class labels come from this table
        self.labels = torch.from_numpy(split.labels).to(device)
        self._pipe: Optional[Pipeline] = None
        self._it: Optional[DALIGenericIterator] = None
        self._clean = True  # False while a pass is under way or was abandoned midway

    def __len__(self) -> int:
        return -(-self._num // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self._num

    def _build(self) -> DALIGenericIterator:
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        from cspx.data.dali_pipelines import eval_pipeline
        self.close()
        self._pipe = eval_pipeline(self.reader, **self.params, batch_size=self.batch_size,
                                   num_threads=self.workers, device_id=self.device_id, seed=0)
        self._it = it = _iterator(self._pipe, ["images", "positions"], self.source,
                                  LastBatchPolicy.PARTIAL)
        return it

    def __iter__(self):
        it = self._it
        if it is None or not self._clean:  # an abandoned pass: start over from a new one
            try:
                it = self._build()
            except RuntimeError as e:
                _reraise(e, self.source)
        self._clean = False
        while True:
            try:
                out = next(it)[0]
            except StopIteration:  # the pass is complete; auto_reset readied the next one
                break
            except RuntimeError as e:
                _reraise(e, self.source)
            # positions stay where DALI made them (the device, on a GPU): the label lookup is a
            # gather there, with no copy to or from the host per batch
            idx = out["positions"].view(-1).to(self.device, torch.int64)
            own = self.device_id is not None
            yield nchw_images(out["images"], self.channels_last, own), self.labels[idx], idx
        self._clean = True

    def close(self) -> None:
        self._it = self._pipe = None
