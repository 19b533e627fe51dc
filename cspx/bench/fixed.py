"""Benchmarks (scripts/benchmark.py): a loader that serves one pre-made batch forever, the
synthetic-data side of the comparisons.

It has the training-loader interface, so the real Trainer runs on it unchanged and any time it
spends beyond the bare forward/backward/step is the trainer's own overhead.
"""
from __future__ import annotations

import torch

from cspx.data.loader import CountedPosition
from cspx.placement import memory_format


class FixedBatchLoader(CountedPosition):
    kind = "fixed"

    def __init__(self, *, images: torch.Tensor, labels: torch.Tensor,
                 batches_per_epoch: int = 1000):
        self.images, self.labels = images, labels   # already on the device, in the model's layout
        self.batches_per_epoch = batches_per_epoch
        self.consumed = 0
        self.bad_files = 0

    @classmethod
    def random(cls, *, batch: int, img_size: int, num_classes: int, device: torch.device,
               channels_last: bool, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> "FixedBatchLoader":
        """A seeded batch of N(0, 1) images (batch, 3, img_size, img_size) and labels below
        num_classes, on `device` in the model's layout and `dtype`."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device, dtype)
        x = x.contiguous(memory_format=memory_format(channels_last))
        y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        return cls(images=x, labels=y)

    def __iter__(self):
        return self

    def __next__(self):
        self.consumed += 1
        return self.images, self.labels

    def close(self) -> None:
        pass
