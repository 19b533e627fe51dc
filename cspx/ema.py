"""The loop's weight average: an exponential moving average of the model's weights, updated
after every optimizer step."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


class ModelEma:
    """ema <- decay * ema + (1 - decay) * model, for parameters and floating-point buffers
    (BN running statistics); integer buffers (num_batches_tracked) are copied.

    The update is one foreach lerp over all tensors: no host sync, a handful of kernels.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        # (EMA floats, model floats, (EMA int, model int) pairs), found at the first update
        self._pairs: Optional[Tuple[List[torch.Tensor], List[torch.Tensor],
                                    List[Tuple[torch.Tensor, torch.Tensor]]]] = None

    def _tensors(self, model: nn.Module):
        if self._pairs is None:
            src = dict(model.state_dict(keep_vars=True))
            dst = dict(self.module.state_dict(keep_vars=True))
            floats = [(dst[k], src[k]) for k in dst if dst[k].is_floating_point()]
            ints = [(dst[k], src[k]) for k in dst if not dst[k].is_floating_point()]
            self._pairs = ([d.data for d, _ in floats], [s.data for _, s in floats], ints)
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: Optional[torch.Tensor] = None) -> None:
        """One step of the average. `skipped` (the step's found_inf under
        train.on_nonfinite=skip, a 0-dim device tensor, 1.0 for a skipped step) makes the weight
        0 for a skipped step, on the device: the average then stays exactly as it was."""
        ema_f, model_f, ints = self._tensors(model)
        if skipped is None:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay)
        else:
            w = (1.0 - skipped) * (1.0 - self.decay)
            torch._foreach_lerp_(ema_f, model_f, [w] * len(ema_f))
        for d, s in ints:
            d.copy_(s)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Restart the average at `model`'s current weights."""
        self.module.load_state_dict(model.state_dict())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
