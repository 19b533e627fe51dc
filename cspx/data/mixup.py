"""Mixup and CutMix, at every training step on the device: timm's `Mixup` (timm/data/mixup.py)
for a micro-batch already on the run's device, from either loader.

Papers: mixup, Zhang et al. 2017 (arXiv 1710.09412); CutMix, Yun et al. 2019 (arXiv 1905.04899).

What timm computes, and so this module:
- Partner: image i is mixed with image n - 1 - i (the batch flipped), as timm does.
- Parameters: with probability `prob` a batch (mode `batch`) or each image (mode `elem`) is mixed;
  when both mixup and CutMix are on, CutMix is chosen with probability `switch_prob`; lambda ~
  Beta(alpha, alpha) of the chosen one.
- Mixup: x * lam + x_flipped * (1 - lam).
- CutMix: a box of the partner is pasted in. Its sides are sqrt(1 - lam) of the image's around a
  uniform centre, clipped at the borders, or with `cutmix_minmax` drawn uniformly from [min, max]
  of each side (alpha is then 1, as timm forces). lambda is then corrected to 1 - box area /
  image area (timm's `correct_lam=True`, always applied with `cutmix_minmax`).
- Targets: one-hot smoothed first (on = 1 - e + e / classes, off = e / classes), then mixed
  with the same lambda: y * lam + y_flipped * (1 - lam).

Random draws happen on the host, from a dedicated `numpy.random.RandomState` in exactly timm's
order and with timm's numpy arithmetic (timm draws from numpy's global generator), so for the same
generator state this module gives timm's lambdas, boxes, images and targets bit for bit (CPU,
float32; tests/test_batch_aug.py). The host draws cost a few microseconds per micro-batch and
never wait for the device: what the device needs (lambdas, boxes) travels with one small copy
from pinned memory, or as Python numbers in batch mode. The generator's state is checkpointed
per rank (cspx.data.batch_aug).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from cspx.data.transforms import memory_format_of

Box = Tuple[int, int, int, int]  # (y_low, y_high, x_low, x_high), rows and columns, end exclusive


def rand_bbox(rng: np.random.RandomState, h: int, w: int, lam) -> Box:
    """timm's `rand_bbox` (margin 0): sides sqrt(1 - lam) of the image's around a uniform centre,
    clipped at the borders. `lam` keeps its numpy type, as timm's does (float32 per image)."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy = rng.randint(0, h)
    cx = rng.randint(0, w)
    yl = np.clip(cy - cut_h // 2, 0, h)
    yh = np.clip(cy + (cut_h + 1) // 2, 0, h)
    xl = np.clip(cx - cut_w // 2, 0, w)
    xh = np.clip(cx + (cut_w + 1) // 2, 0, w)
    return int(yl), int(yh), int(xl), int(xh)


def rand_bbox_minmax(rng: np.random.RandomState, h: int, w: int,
                     minmax: Sequence[float]) -> Box:
    """timm's `rand_bbox_minmax`: each side uniform in [int(side * min), int(side * max)), the
    box anywhere inside the image."""
    cut_h = rng.randint(int(h * minmax[0]), int(h * minmax[1]))
    cut_w = rng.randint(int(w * minmax[0]), int(w * minmax[1]))
    yl = rng.randint(0, h - cut_h + 1)
    xl = rng.randint(0, w - cut_w + 1)
    return int(yl), int(yl + cut_h), int(xl), int(xl + cut_w)


def cutmix_box_and_lam(rng: np.random.RandomState, h: int, w: int, lam,
                       minmax: Optional[Sequence[float]]):
    """timm's `cutmix_bbox_and_lam` with correct_lam=True: (box, 1 - box area / image area)."""
    box = rand_bbox_minmax(rng, h, w, minmax) if minmax is not None else rand_bbox(rng, h, w, lam)
    yl, yh, xl, xh = box
    return box, 1. - (yh - yl) * (xh - xl) / float(h * w)


@dataclass
class MixParams:
    """One micro-batch's draws. batch mode: `lam` a float, `box` the CutMix box or None.
    elem mode: `lam` float32 (n,) (corrected for CutMix images), `cut` bool (n,), `boxes` int
    (n, 4) (zeros where no box)."""

    lam: Union[float, np.ndarray]
    box: Optional[Box] = None
    cut: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None


class Mixup:
    """timm's Mixup in `batch` or `elem` mode, on device batches. Call it with (images (N,3,H,W)
    float, labels int64 (N,)); it returns (mixed images, soft targets float32 (N, classes))."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float,
                 cutmix_minmax: Optional[Sequence[float]], prob: float, switch_prob: float,
                 mode: str, label_smoothing: float, num_classes: int,
                 rng: np.random.RandomState):
        if mode not in ("batch", "elem"):
            raise ValueError(f"mode must be 'batch' or 'elem', not {mode!r}")
        self.mixup_alpha = mixup_alpha
        # timm forces alpha 1 with a min-max box: lambda then only decides "mixed or not"
        self.cutmix_alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            raise ValueError("mixup_alpha or cutmix_alpha (or cutmix_minmax) must be on")
        self.minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.rng = rng

    # ----- host: the draws, in timm's order --------------------------------------------------
    def _lam_and_cut(self, size: Optional[int]):
        """Beta lambda and the CutMix choice: timm's _params_per_batch (size None) body after
        the mix_prob draw, or _params_per_elem's arrays (size n)."""
        r, m, c = self.rng, self.mixup_alpha, self.cutmix_alpha
        if m > 0 and c > 0:
            cut = r.rand(size) < self.switch_prob if size else r.rand() < self.switch_prob
            if size:
                return np.where(cut, r.beta(c, c, size=size), r.beta(m, m, size=size)), cut
            return (r.beta(c, c) if cut else r.beta(m, m)), cut
        if m > 0:
            return r.beta(m, m, size=size), (np.zeros(size, dtype=bool) if size else False)
        return r.beta(c, c, size=size), (np.ones(size, dtype=bool) if size else True)

    def draw(self, n: int, h: int, w: int) -> MixParams:
        if self.mode == "batch":
            if not self.rng.rand() < self.prob:
                return MixParams(lam=1.)
            lam, cut = self._lam_and_cut(None)
            lam = float(lam)
            if lam == 1. or not cut:
                return MixParams(lam=lam)
            box, lam = cutmix_box_and_lam(self.rng, h, w, lam, self.minmax)
            return MixParams(lam=lam, box=box)
        lam_mix, cut = self._lam_and_cut(n)
        lam = np.where(self.rng.rand(n) < self.prob, lam_mix.astype(np.float32),
                       np.ones(n, dtype=np.float32))
        boxes = np.zeros((n, 4), dtype=np.int64)
        for i in range(n):  # one box per CutMix image, drawn in image order as timm does
            if lam[i] != 1. and cut[i]:
                boxes[i], lam[i] = cutmix_box_and_lam(self.rng, h, w, lam[i], self.minmax)
        return MixParams(lam=lam, cut=cut, boxes=boxes)

    # ----- device: the images and targets ------------------------------------------------------
    def targets(self, labels: torch.Tensor, lam) -> torch.Tensor:
        """timm's mixup_target: smoothed one-hot, mixed with its flip. lam: a float or (n, 1)."""
        off = self.label_smoothing / self.num_classes
        on = 1. - self.label_smoothing + off
        y1 = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        y1.scatter_(1, labels.long().view(-1, 1), on)
        return y1 * lam + y1.flip(0) * (1. - lam)

    def apply(self, x: torch.Tensor, labels: torch.Tensor,
              p: MixParams) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "batch":
            lam = p.lam
            assert isinstance(lam, float)  # one lambda for the batch (draw)
            if lam == 1.:
                return x, self.targets(labels, lam)
            if p.box is not None:
                yl, yh, xl, xh = p.box
                out = x.clone(memory_format=torch.preserve_format)
                out[:, :, yl:yh, xl:xh] = x[:, :, yl:yh, xl:xh].flip(0)
            else:
                out = x.mul(lam).add_(x.flip(0).mul_(1. - lam))
            return out, self.targets(labels, lam)
        return self._apply_elem(x, labels, p)

    def _apply_elem(self, x, labels, p: MixParams):
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        assert p.cut is not None and p.boxes is not None  # elem mode's draws (draw)
        # per image: target lambda, blend weight (1 for CutMix and unmixed images: x * 1 +
        # x' * 0 is x itself), box (empty where none was drawn)
        host = np.empty((n, 6), dtype=np.float32)
        host[:, 0] = p.lam
        host[:, 1] = np.where(p.cut, np.float32(1), p.lam)
        host[:, 2:] = p.boxes
        table = torch.from_numpy(host)
        if x.device.type == "cuda":
            table = table.pin_memory()
        table = table.to(x.device, non_blocking=True)
        lam, blend = table[:, 0:1], table[:, 1].view(n, 1, 1, 1)
        flipped = x.flip(0)
        out = (x * blend + flipped * (1 - blend)).to(x.dtype)
        if p.cut.any():
            yl, yh, xl, xh = (table[:, k].view(n, 1, 1, 1) for k in range(2, 6))
            rows = torch.arange(h, device=x.device, dtype=torch.float32).view(1, 1, h, 1)
            cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, 1, w)
            inside = ((rows >= yl) & (rows < yh)) & ((cols >= xl) & (cols < xh))
            out = torch.where(inside, flipped, out)
        out = out.contiguous(memory_format=memory_format_of(x))
        return out, self.targets(labels, lam)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        return self.apply(x, labels, self.draw(x.shape[0], x.shape[-2], x.shape[-1]))

