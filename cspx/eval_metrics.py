"""Evaluation metrics, used by the training loop and by validate.py: top-1 / top-5 / loss over an
evaluation loader, exact across ranks.

Each rank evaluates its own disjoint share (no padding, uneven shares allowed) and keeps running
sums on the device; one all-reduce at the end adds them up. Counts are integers in int64 and the
loss sum is float64, so the totals equal single-process evaluation exactly (the loss up to
float64 summation order).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cspx import precision, watchdog
from cspx.data.loader import EvalLoader
from cspx.distributed import DistEnv, all_reduce_sum

# on_batch(indices (N,) int64 CPU, labels (N,), top-k indices (N, k), top-k probabilities (N, k))
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def evaluate(model: nn.Module, loader: EvalLoader, env: DistEnv, precision_name: str = "fp32",
             on_batch: Optional[BatchHook] = None, progress=None) -> Dict[str, float]:
    """Returns {'top1', 'top5' (percent), 'loss' (mean CE), 'count', 'failed', 'seconds'}.

    Images whose label is -1 failed to decode: they are counted in 'failed', not in 'count'.
    """
    device = env.device
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    failed = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    start, batches = time.perf_counter(), 0
    for images, labels, indices in loader:
        with precision.autocast(precision_name, device):
            logits = model(images)
        logits = logits.float()
        valid = labels >= 0
        safe = labels.clamp(min=0)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1)
        hit = top.indices == safe[:, None]                              # (N, k)
        correct1 += (hit[:, 0] & valid).sum()
        correct5 += (hit.any(dim=1) & valid).sum()
        loss = F.cross_entropy(logits, safe, reduction="none")          # (N,)
        loss_sum += (loss.double() * valid).sum()
        count += valid.sum()
        failed += (~valid).sum()
        if on_batch is not None:
            probs = torch.softmax(logits, dim=1).gather(1, top.indices)
            on_batch(indices.cpu(), labels.cpu(), top.indices.cpu(), probs.cpu())
        if progress is not None:
            progress.update(int(images.shape[0]))
        batches += 1
        watchdog.progress("evaluation batch", batches)
    # the only host syncs of an evaluation: one per pass, not per batch
    ints = all_reduce_sum(torch.stack([correct1, correct5, count, failed]), env).tolist()
    loss_total = all_reduce_sum(loss_sum, env).tolist()
    if was_training:
        model.train()
    c1, c5, n, bad = ints
    seconds = time.perf_counter() - start
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1),
            "loss": loss_total / max(n, 1), "count": n, "failed": bad, "seconds": seconds}
