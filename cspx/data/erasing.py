"""Random erasing, at every training step on the device: timm's `RandomErasing`
(timm/data/random_erasing.py) on a normalized micro-batch from either loader, per image.

Paper: Random Erasing Data Augmentation, Zhong et al. 2017 (arXiv 1708.04896).

Per image, as timm: with probability `prob`, draw a count uniform in 1..max_count; for each box
try up to 10 times: target area U(0.02, 1/3) of the image divided by the count, aspect ratio
exp(U(log 0.3, log 1/0.3)), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the
first try with h < H and w < W places the box at a uniform position (a box with no such try is
skipped). The box is filled, in normalized units, with 0 (`const`), one N(0, 1) value per channel
(`rand`) or N(0, 1) per pixel and channel (`pixel`); later boxes of an image cover earlier ones.

Where timm loops over images in Python with Python's `random`, cspx draws the same quantities for
the whole batch at once with numpy on the host (a dedicated generator, checkpointed) and erases on
the device with masks, so nothing waits for the device and the cost per image is a few
elementwise passes. The distributions are timm's (tests/test_batch_aug.py compares box areas,
aspect ratios and the erased fraction with timm's own RandomErasing on 10,000 images); the random
streams are not. Fill values come from a dedicated torch.Generator on the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cspx.data.transforms import memory_format_of

# timm's RandomErasing defaults (min_area, max_area, min_aspect; max_aspect = 1 / min_aspect),
# which its training script uses; the paper's s_l, s_h, r_1 are 0.02, 0.4, 0.3
MIN_AREA, MAX_AREA, MIN_ASPECT = 0.02, 1 / 3, 0.3
ATTEMPTS = 10
MODES = ("const", "rand", "pixel")


class RandomErasing:
    """Call with a normalized float batch (N, C, H, W) on its device; returns the erased batch
    (a new tensor; the input is left as it is)."""

    def __init__(self, *, prob: float, mode: str, max_count: int, rng: np.random.RandomState,
                 generator: torch.Generator):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.prob, self.mode, self.max_count = prob, mode, max_count
        self.rng, self.generator = rng, generator
        self.log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))

    def draw(self, n: int, h: int, w: int) -> np.ndarray:
        """Boxes int64 (n, max_count, 4) as (top, left, height, width); height 0: no box."""
        r, k = self.rng, self.max_count
        erased = r.random_sample(n) <= self.prob    # timm skips an image when random() > prob
        count = r.randint(1, k + 1, size=n) if k > 1 else np.ones(n, dtype=np.int64)
        area = r.uniform(MIN_AREA, MAX_AREA, size=(n, k, ATTEMPTS)) * (h * w) / count[:, None, None]
        aspect = np.exp(r.uniform(*self.log_aspect, size=(n, k, ATTEMPTS)))
        bh = np.round(np.sqrt(area * aspect)).astype(np.int64)  # round half to even, as Python's
        bw = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = (bw < w) & (bh < h)
        first = fits.argmax(-1)[..., None]               # the first try that fits
        bh = np.take_along_axis(bh, first, -1)[..., 0]
        bw = np.take_along_axis(bw, first, -1)[..., 0]
        # uniform top in 0..h - bh, left in 0..w - bw (timm: randint(0, h - bh) inclusive)
        top = np.floor(r.random_sample((n, k)) * (h - bh + 1)).astype(np.int64)
        left = np.floor(r.random_sample((n, k)) * (w - bw + 1)).astype(np.int64)
        used = erased[:, None] & fits.any(-1) & (np.arange(k)[None, :] < count[:, None])
        return np.stack([top, left, bh * used, bw * used], -1)

    def apply(self, x: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        n, c, h, w = x.shape
        used = boxes[..., 2] > 0
        if not used.any():  # decided on the host: no device work, no sync
            return x
        slots = [j for j in range(boxes.shape[1]) if used[:, j].any()]
        table = torch.from_numpy(np.ascontiguousarray(boxes[:, slots]).astype(np.float32))
        if x.device.type == "cuda":
            table = table.pin_memory()
        table = table.to(x.device, non_blocking=True)    # (n, boxes, 4)
        top, left, bh, bw = (table[..., i].view(n, len(slots), 1, 1) for i in range(4))
        rows = torch.arange(h, device=x.device, dtype=torch.float32).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, 1, w)
        # rows and columns apart, then one full-size AND: (n, boxes, H, 1) & (n, boxes, 1, W)
        inside = ((rows >= top) & (rows < top + bh)) & ((cols >= left) & (cols < left + bw))
        if self.mode == "rand":  # one colour per box: later boxes cover earlier ones, as timm
            fill = torch.randn((n, len(slots), c), generator=self.generator, device=x.device,
                               dtype=torch.float32).to(x.dtype)
            out = x
            for j in range(len(slots)):
                out = torch.where(inside[:, j:j + 1], fill[:, j, :, None, None], out)
        else:
            if self.mode == "pixel":
                fill = torch.randn(x.shape, generator=self.generator, device=x.device,
                                   dtype=torch.float32).to(x.dtype)
            else:
                fill = torch.zeros((), device=x.device, dtype=x.dtype)
            out = torch.where(inside.any(1, keepdim=True), fill, x)
        return out.contiguous(memory_format=memory_format_of(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.shape[-2], x.shape[-1]))

