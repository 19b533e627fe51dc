"""The `evaldiff` benchmark: how far DALI's evaluation images are from PIL's (torchvision's
Resize + CenterCrop, the protocol behind published ImageNet numbers) on the same JPEGs, and what
that does to top-1. It produces the DALI-vs-PIL table of docs/dali.md.

Everything runs on the CPU, where DALI decodes with the same libjpeg-turbo as Pillow, so only
resizing and cropping differ. Contenders, each against PIL with the same filter:
  cspx DALI eval   cspx's eval pipeline (torchvision's sizes and crop offsets, no sub-pixel
                   scale), bilinear and bicubic
  naive DALI       the obvious pipeline: resize_shorter, crop_mirror_normalize crop_pos 0.5
Per image, the mean absolute difference in normalized units (one grey level is about 0.0175;
reported as the average and the worst over images) and the largest difference (worst image);
then the top-1 agreement of a probe model (`Probe`) over --rounds seeds.
"""
from __future__ import annotations

import os
import tempfile
from argparse import Namespace
from typing import Dict, List, Tuple

import torch
from torch import nn

from cspx.data.index import build_index, read_classes_file
from cspx.data.torch_loader import TorchEvalLoader
from cspx.data.transforms import eval_resize_size
from cspx.models import eval_protocol

CPU = torch.device("cpu")


class Probe(nn.Module):
    """A model whose top-1 varies across images without trained weights: random conv features
    with BatchNorm statistics of the images it is calibrated on, centred on their mean (a random
    network's pooled features share one dominant direction, which makes every argmax the same),
    then a random linear readout over 1000 classes. It sees full-resolution detail, like a real
    network, but its top-2 margins are far smaller than a trained one's, so it exaggerates flips."""
    center: torch.Tensor  # a buffer: the calibration images' mean feature

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for co in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, co, 3, 2, 1, bias=False), nn.BatchNorm2d(co, momentum=None),
                       nn.ReLU()]
            c = co
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, 1000, bias=False)
        self.register_buffer("center", torch.zeros(c))

    @torch.no_grad()
    def calibrate(self, x):
        self.train()
        self.features(x)  # momentum=None: running stats become this batch's statistics
        self.eval()
        self.center.copy_(self.features(x).mean(0))

    def forward(self, x):
        return self.fc(self.features(x) - self.center)


def _collect(batches, n: int) -> torch.Tensor:
    """(n, 3, H, W) images in index order from (images, labels, indices) batches."""
    out: Dict[int, torch.Tensor] = {}
    for x, _, idx in batches:
        for img, k in zip(x, idx.tolist()):
            out[k] = img.float()
    return torch.stack([out[k] for k in range(n)])


def _naive(index, img_size: int, crop_pct: float, interpolation: str, batch: int, workers: int,
           lists: str):
    """The obvious DALI eval pipeline: DALI's resize_shorter and crop_pos 0.5 (docs/dali.md)."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    from nvidia.dali.types import DALIDataType, DALIImageType

    from cspx.data.dali_loader import _file_list
    from cspx.data.dali_pipelines import INTERP, MEAN_255, STD_255

    @pipeline_def
    def pipe():
        jpegs, positions = fn.readers.file(file_root=index.root, name="Reader",
                                           file_list=_file_list(lists, "val", index, True),
                                           random_shuffle=False, pad_last_batch=True)
        images = fn.decoders.image(jpegs, device="cpu", output_type=DALIImageType.RGB)
        resized = fn.resize(images, resize_shorter=eval_resize_size(img_size, crop_pct),
                            interp_type=INTERP[interpolation], antialias=True)
        # fn.resize is typed DataNode | Sequence | None (save_attrs adds an output): one here
        images = fn.crop_mirror_normalize(resized,  # type: ignore[arg-type]
                                          crop=(img_size, img_size), crop_pos_x=0.5,
                                          crop_pos_y=0.5, mean=MEAN_255, std=STD_255,
                                          dtype=DALIDataType.FLOAT, output_layout="CHW")
        return images, positions

    it = DALIGenericIterator([pipe(batch_size=batch, num_threads=workers, device_id=None,
                                   seed=0)], ["images", "positions"], reader_name="Reader",
                             last_batch_policy=LastBatchPolicy.PARTIAL)
    for out in it:
        yield out[0]["images"], None, out[0]["positions"].view(-1).long()


def evaldiff(args: Namespace) -> Tuple[List[Dict], Dict]:
    from cspx.data.dali_loader import DaliEvalLoader
    classes = os.path.join(os.path.dirname(os.path.abspath(args.data)), "synsets.txt")
    index = build_index(args.data, read_classes_file(classes) if os.path.isfile(classes) else None,
                        warn=False)
    n, size, workers = len(index), args.img_size, max(1, args.workers)
    crop = eval_protocol(args.model, img_size=size).crop_pct  # the model's: 0.875 for CSP models
    ref: Dict[str, torch.Tensor] = {}
    rows = []
    with tempfile.TemporaryDirectory() as lists:
        for name, interp in (("cspx DALI eval, bilinear", "bilinear"),
                             ("cspx DALI eval, bicubic", "bicubic"),
                             ("naive DALI (resize_shorter, crop_pos 0.5), bilinear", "bilinear")):
            if interp not in ref:
                ref[interp] = _collect(TorchEvalLoader(split=index, img_size=size, crop_pct=crop,
                                                       interpolation=interp, batch_size=args.batch,
                                                       rank=0, world=1, workers=0, device=CPU,
                                                       channels_last=False), n)
            if name.startswith("naive"):
                got = _collect(_naive(index, size, crop, interp, args.batch, workers, lists), n)
            else:
                ld = DaliEvalLoader(split=index, img_size=size, crop_pct=crop,
                                    interpolation=interp, batch_size=args.batch, rank=0, world=1,
                                    workers=workers, device=CPU, channels_last=False,
                                    file_list_dir=lists)
                got = _collect(ld, n)
                ld.close()
            rows.append(args.report.row({"pipeline": name, **_compare(ref[interp], got,
                                                                      args.rounds)}))
    return rows, {"images": n, "img_size": size, "crop_pct": crop, "seeds": args.rounds}


def _compare(ref: torch.Tensor, got: torch.Tensor, seeds: int) -> Dict:
    d = (got - ref).abs().flatten(1)
    means, maxes = d.mean(1), d.max(1).values
    agree, distinct = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        probe = Probe()
        probe.calibrate(ref)
        with torch.no_grad():
            p_ref, p_got = probe(ref).argmax(1), probe(got).argmax(1)
        agree.append(100.0 * float((p_ref == p_got).float().mean()))
        distinct.append(len(set(p_ref.tolist())))
    return {"mean |d| avg": float(means.mean()), "mean |d| worst": float(means.max()),
            "max |d| worst": float(maxes.max()), "top-1 agree % min": min(agree),
            "top-1 agree % max": max(agree), "distinct top-1": min(distinct)}
