"""The loop's backbone freeze (`train.freeze_backbone_steps: N`): for the optimizer steps 0 to
N - 1 only the classifier trains, from step N on everything does (linear probing, then
fine-tuning).

While frozen, the backbone (every parameter outside `model.get_classifier()`) is a fixed feature
extractor, as torchvision's detection backbones (FrozenBatchNorm2d) and timm.utils.freeze make one:
- its parameters do not require gradients, so backward stops at the classifier (no backbone
  gradient is computed, all-reduced or applied: no weight decay, no optimizer state);
- its modules are in eval mode: BatchNorm normalises with its pretrained running statistics and
  does not update them, stochastic depth and dropout are off. (The classifier's own modules,
  e.g. the dropout before it, keep training mode.)

Whether the backbone is frozen is a function of the step alone, so a run resumed at any step,
before, at or after N, is in the state of an uninterrupted one. `apply(step)` reports a change
of requires_grad: DistributedDataParallel registers only the parameters that require gradients
when it is built, and torch.compile guards on them, so the Trainer rebuilds both then (once, at
step N).
"""
from __future__ import annotations

from typing import List

from torch import nn

from cspx.optim import classifier


class BackboneFreeze:
    def __init__(self, model: nn.Module, *, steps: int):
        self.steps = steps
        head = classifier(model)
        trained = {id(p) for p in head.parameters()}
        self.params: List[nn.Parameter] = [p for p in model.parameters() if id(p) not in trained]
        # modules held in eval mode: all but the module holding the classifier (CspNet's head:
        # pooling, dropout, fc), its children, and the modules above it; the classifier alone
        # where the model itself holds it
        parent = next(m for m in model.modules() if any(c is head for c in m.children()))
        keep = {id(m) for m in (head if parent is model else parent).modules()}
        keep |= {id(m) for m in model.modules() if any(c is parent for c in m.modules())}
        self.modules: List[nn.Module] = [m for m in model.modules() if id(m) not in keep]
        self.frozen = False

    def frozen_at(self, step: int) -> bool:
        return step < self.steps

    def apply(self, step: int) -> bool:
        """Put the model in `step`'s state; returns True when requires_grad changed."""
        want = self.frozen_at(step)
        changed = want != self.frozen
        if changed:
            for p in self.params:
                p.requires_grad_(not want)
            self.frozen = want
            if not want:
                for m in self.modules:
                    m.train(True)
        if self.frozen:
            # evaluation (cspx.eval_metrics) returns the whole model to training mode
            for m in self.modules:
                m.training = False
        return changed
