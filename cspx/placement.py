"""Setup of every command that runs a model (train.py, validate.py, export, predict, the
benchmarks): where the model runs and how, in one place. `place_model` moves a model to its
device in its memory format, and wraps it (DistributedDataParallel, torch.compile) where asked;
`memory_format` is the one spelling of the layout choice, for the batches fed to a model too.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def memory_format(channels_last: bool) -> torch.memory_format:
    """torch.channels_last (NHWC in memory: faster convolutions on tensor cores) or
    torch.contiguous_format (NCHW)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def place_model(model: nn.Module, *, device: torch.device, channels_last: bool = False,
                compile: bool = False, compile_mode: str = "default",
                compile_backend: str = "inductor",
                wrap: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """Move `model`'s parameters and buffers, in place, to `device` and, for 4-d tensors, to
    the memory format `channels_last` asks for (placing a placed model again moves nothing).
    Then `wrap` it (DistributedDataParallel, for training) and torch.compile it with `compile`
    (`compile_mode`: the recipe's model.compile_mode; `compile_backend` other than inductor
    rehearses the compile path on a CPU, as scripts/gpu_check.sh --rehearse does).

    Returns the module to call: `model` itself when neither wrap nor compile applies. `model`
    stays the plain module (its state_dict keys carry no wrapper prefix): keep it for
    checkpoints, EMA and evaluation. Training or eval mode is the caller's."""
    # Module.to takes memory_format beside a device; its typed overloads take it alone
    model.to(device, memory_format=memory_format(channels_last))  # type: ignore[call-overload]
    forward: nn.Module = model
    if wrap is not None:
        forward = wrap(forward)
    if compile:
        # torch.compile of a Module returns an OptimizedModule (a Module); it is typed Callable
        forward = (torch.compile(forward, mode=compile_mode)  # type: ignore[assignment]
                   if compile_backend == "inductor"
                   else torch.compile(forward, backend=compile_backend))
    return forward
