"""Batch augmentation, at every training step: random erasing, then mixup / CutMix, on the
device, on the micro-batch either loader hands out, so the torch and DALI paths augment alike.
The order is timm's: erasing belongs to the per-image transform (after normalization), mixing
to the batch.

Random state. Its own generators, per rank, never the process's: a numpy RandomState on the host
for every draw that decides shapes (lambdas, boxes; what timm draws from numpy's and Python's
global generators), and a torch.Generator on the device for the erasing fill values. So turning
an option on does not shift the model's random stream (dropout, stochastic depth) or the loaders',
and the stage's state is one checkpointed per-rank part (`state_dict`), which makes a resumed run
continue with the draws an uninterrupted one makes. Seeds derive from (seed, rank): ranks draw
differently, as timm's per-rank seeding does.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from cspx.config import AugConfig
from cspx.data.erasing import RandomErasing
from cspx.data.mixup import Mixup
from cspx.data.transforms import sample_seed


class BatchAugment:
    """(images, labels int64) -> (images, targets): labels unchanged without mixing, else soft
    targets float32 (N, classes) that already hold the label smoothing (timm's mixup_target)."""

    def __init__(self, *, aug: AugConfig, num_classes: int, label_smoothing: float,
                 device: torch.device, seed: int, rank: int):
        self.device = device
        self.rng = np.random.RandomState(sample_seed(seed, -3, rank) % 2**32)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(sample_seed(seed, -4, rank))
        self.erasing: Optional[RandomErasing] = None
        self.mixup: Optional[Mixup] = None
        if aug.erase_prob > 0:
            self.erasing = RandomErasing(prob=aug.erase_prob, mode=aug.erase_mode,
                                         max_count=aug.erase_count, rng=self.rng,
                                         generator=self.generator)
        if aug.mixing:
            self.mixup = Mixup(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
                               cutmix_minmax=aug.cutmix_minmax, prob=aug.mix_prob,
                               switch_prob=aug.mix_switch_prob, mode=aug.mix_mode,
                               label_smoothing=label_smoothing, num_classes=num_classes,
                               rng=self.rng)

    @property
    def active(self) -> bool:
        return self.erasing is not None or self.mixup is not None

    def __call__(self, images: torch.Tensor,
                 labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels

    # ----- checkpoint (per rank) ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and numbers (torch.load(weights_only=True) reads them back)."""
        state = self.rng.get_state(legacy=True)
        assert isinstance(state, tuple)  # MT19937's: a dict only for other bit generators
        name, keys, pos, has_gauss, cached = state
        return {"numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                          int(has_gauss), float(cached)],
                "device": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        self.rng.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        self.generator.set_state(state["device"])
