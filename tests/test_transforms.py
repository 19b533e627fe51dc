"""Training transforms: per-sample seeding draws what torch.manual_seed would and leaves the
caller's generator alone; the stages run in the order, with the draws, they always had."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from cspx.config import AugConfig
from cspx.data.transforms import TrainTransform, seeded


def test_seeded_draws_as_manual_seed_and_restores_the_callers_state():
    torch.manual_seed(1)
    with torch.random.fork_rng(devices=[]):  # the reference: torch's own seeding
        torch.manual_seed(1234)
        ref = torch.rand(5)
    ref_after = torch.rand(3)
    torch.manual_seed(1)
    with seeded(1234):
        got = torch.rand(5)
    assert torch.equal(got, ref) and torch.equal(torch.rand(3), ref_after)


def _scale(s: float) -> float:
    """darknet rand_scale, written out: u ~ U(1, s), then u or 1/u with equal odds."""
    lo, hi = min(1.0, s), max(1.0, s)
    u = lo + (hi - lo) * float(torch.rand(()))
    return u if float(torch.rand(())) < 0.5 else 1.0 / u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_stage_in_order_with_its_draws(seed):
    aug = AugConfig(img_size=32, rotate=10.0, hue=0.1, saturation=1.5, exposure=1.5,
                    randaugment_ops=2, hflip=0.5)
    t = TrainTransform(aug)
    assert [name for name, _ in t.steps] == ["crop", "rotate", "flip", "hue", "saturation",
                                             "exposure", "RandAugment", "to tensor"]
    assert [name for name, _ in TrainTransform(AugConfig(policy="autoaugment")).steps] == [
        "crop", "flip", "AutoAugment", "to tensor"]
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    with seeded(seed):
        got = t(img)
    with seeded(seed):  # the pipeline as documented, stage by stage
        x = t.rrc(img)
        x = F.rotate(x, (float(torch.rand(())) * 2 - 1) * 10.0,
                     interpolation=T.InterpolationMode.BILINEAR)
        x = F.hflip(x) if float(torch.rand(())) < 0.5 else x
        x = F.adjust_hue(x, (float(torch.rand(())) * 2 - 1) * 0.1)
        x = F.adjust_saturation(x, _scale(1.5))
        x = F.adjust_brightness(x, _scale(1.5))
        x = t.policy(x)
        ref = torch.from_numpy(np.asarray(x, dtype=np.uint8).copy()).permute(2, 0, 1)
    assert got.dtype == torch.uint8 and torch.equal(got, ref)
