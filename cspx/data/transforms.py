"""Per-image work of every training step and evaluation: PIL transforms for the torch data path,
and the on-device normalization both paths share.

Transforms end in uint8 CHW tensors: a batch crosses to the GPU as 1 byte per value (4x less than
float32) and is normalized there by `normalize_`, with exactly the arithmetic of torchvision's
ToTensor + Normalize (x / 255, then (x - mean) / std in float32), so the result is bit-identical
to timm's eval transform.

Training randomness is drawn from torch's global generator inside `seeded(...)`, re-seeded per
sample from (seed, epoch, index): a sample's augmentation does not depend on which worker
decodes it or how many workers there are, and a resumed run reproduces it exactly.
"""
from __future__ import annotations

import hashlib
import io
import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from cspx.config import AugConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
          "nearest": T.InterpolationMode.NEAREST}

# timm's RandAugment magnitude runs 0..10 (_LEVEL_DENOM); torchvision's and DALI's run over
# 31 bins, bin 30 being the same maximum (rotate 30 deg, shear 0.3, enhance +-0.9, ...).
RA_BINS = 31


def ra_magnitude_bin(magnitude: float) -> int:
    """timm's 0-10 magnitude -> bin index 0..30 used by torchvision and DALI (7 -> 21)."""
    return int(round(magnitude / 10.0 * (RA_BINS - 1)))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed, decorrelated across (seed, epoch, index) by a hash."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with torch's CPU generator seeded, restoring the caller's state afterwards (the main
    process decodes with 0 workers, and its generator belongs to the training run).

    Only the CPU generator, which every transform draws from, is seeded and restored: the same
    draws as `torch.manual_seed` and `fork_rng` give, for 7 instead of 190-420 us per sample
    (`torch.manual_seed` also seeds every CUDA generator, lazily in a process without CUDA,
    recording a stack trace each time: the deeper the call stack, the slower). With 0 workers
    on a GPU, the run's own CUDA generators are no longer reseeded by every sample either."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode an image file's bytes; grayscale, CMYK and palette images become RGB. The
    same bytes decode to the same pixels whether they came from a file or a shard."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return decode_rgb(f.read())


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: floor(img_size / crop_pct), timm's rule
    (224 / 0.875 = 256 exactly)."""
    return int(math.floor(img_size / crop_pct))


def eval_transform(img_size: int, crop_pct: float, interpolation: str) -> T.Compose:
    return T.Compose([T.Resize(eval_resize_size(img_size, crop_pct),
                               interpolation=INTERP[interpolation]),
                      T.CenterCrop(img_size), to_uint8_chw])


def _rand() -> float:
    """U(0, 1) from torch's CPU generator (a CPU scalar: no device sync)."""
    return float(torch.rand(()))


def _darknet_scale(s: float) -> float:
    """darknet rand_scale: u ~ U(1, s) (either order), then u or 1/u with equal odds."""
    lo, hi = min(1.0, s), max(1.0, s)
    u = lo + (hi - lo) * _rand()
    return u if _rand() < 0.5 else 1.0 / u


def policy_transform(aug: AugConfig):
    """aug.policy as torchvision's transform, or None: RandAugment (randaugment_ops ops at
    randaugment_magnitude, 31 bins), TrivialAugmentWide (31 bins) or AutoAugment's ImageNet
    policy (10 bins); geometric ops sample as aug.randaugment_interpolation says, and fill with
    black (torchvision's default on PIL images)."""
    interp = INTERP[aug.randaugment_interpolation]
    if aug.policy == "randaugment" and aug.randaugment_ops > 0:
        return T.RandAugment(num_ops=aug.randaugment_ops,
                             magnitude=ra_magnitude_bin(aug.randaugment_magnitude),
                             num_magnitude_bins=RA_BINS, interpolation=interp)
    if aug.policy == "trivialaugment":
        return T.TrivialAugmentWide(num_magnitude_bins=31, interpolation=interp)
    if aug.policy == "autoaugment":
        return T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=interp)
    return None


# the policy stage's name in TrainTransform.steps, per aug.policy
POLICY_STAGES = {"randaugment": "RandAugment", "trivialaugment": "TrivialAugment",
                 "autoaugment": "AutoAugment"}


class TrainTransform:
    """random-resized-crop -> rotate -> flip -> darknet colour jitter -> policy -> uint8.

    Call it inside `seeded(sample_seed(...))`; every random draw comes from torch's generator.
    `steps` names each stage the config turns on ((name, callable) pairs, applied in order),
    so benchmarks can time the stages of this very transform (cspx/bench/peer_steps.py).
    """

    def __init__(self, aug: AugConfig):
        self.aug = aug
        interp = INTERP[aug.interpolation]
        self.rrc = T.RandomResizedCrop(aug.img_size, scale=aug.scale, ratio=aug.ratio,
                                       interpolation=interp)
        self.policy = policy_transform(aug)
        a = aug
        self.steps = [("crop", self.rrc)]
        if a.rotate > 0:
            self.steps.append(("rotate", self._rotate))
        # the flip draws its coin even at hflip 0, as it always has: the draws after it keep
        # their place in the generator's sequence
        self.steps.append(("flip", self._flip))
        for name, on in (("hue", a.hue > 0), ("saturation", a.saturation != 1.0),
                         ("exposure", a.exposure != 1.0)):
            if on:
                self.steps.append((name, getattr(self, "_" + name)))
        if self.policy is not None:
            self.steps.append((POLICY_STAGES[a.policy], self.policy))
        self.steps.append(("to tensor", to_uint8_chw))

    def _rotate(self, img: Image.Image) -> Image.Image:
        angle = (_rand() * 2 - 1) * self.aug.rotate
        return F.rotate(img, angle, interpolation=T.InterpolationMode.BILINEAR)

    def _flip(self, img: Image.Image) -> Image.Image:
        return F.hflip(img) if _rand() < self.aug.hflip else img

    def _hue(self, img: Image.Image) -> Image.Image:
        return F.adjust_hue(img, (_rand() * 2 - 1) * self.aug.hue)

    def _saturation(self, img: Image.Image) -> Image.Image:
        return F.adjust_saturation(img, _darknet_scale(self.aug.saturation))

    def _exposure(self, img: Image.Image) -> Image.Image:
        return F.adjust_brightness(img, _darknet_scale(self.aug.exposure))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x: Any = img  # a PIL image through the stages, a tensor after the last one
        for _, step in self.steps:
            x = step(x)
        return x


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, as ToTensor + Normalize compute it. mean/std: (3, 1, 1)."""
    return x.float().div_(255).sub_(mean).div_(std)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided batch, else contiguous: what a new batch made from `x`
    keeps, so the model gets the layout it asked its loader for."""
    return (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def mean_std(device: torch.device):
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std
